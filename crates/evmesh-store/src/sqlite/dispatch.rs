//! Group dispatch: one task per durable group (or ephemeral subscription) that owns
//! all of its state: what is ready, in flight, waiting for a retry, settled, and
//! which aggregates are busy. Members get deliveries through bounded channels and
//! answer with acks and nacks; nothing here waits on a member.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use sqlx::Row;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Log;
use super::writer::{Checkpoint, DeadRow, ParkedChange, WriteOp};
use crate::{
    Delivery, Feedback, GroupInfo, Membership, Pattern, Result, StoreError, StoredEvent,
    Subscription, SubscriptionControl, SubscriptionSpec,
};

/// Events loaded and waiting for a member with room.
const READY_MAX: usize = 1024;
/// Events read from the log at a time.
const READ_BATCH: usize = 256;
/// How far past the ack floor a group reads: one stuck event holds back at most this
/// many, which bounds the settled set kept above the floor.
const SPAN_MAX: u64 = 1 << 16;
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
    pub(crate) fn patterns_sql(patterns: &[Pattern]) -> String {
        patterns
            .iter()
            .map(Pattern::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub(crate) fn from_sql(row: &sqlx::sqlite::SqliteRow) -> Result<Self> {
        let name: String = row.get(0);
        let patterns = row
            .get::<&str, _>(1)
            .lines()
            .map(Pattern::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                StoreError::InvalidArgument(format!("stored pattern of group {name:?} {e}"))
            })?;
        Ok(Self {
            name,
            patterns,
            ack_timeout: Duration::from_millis(u64::try_from(row.get::<i64, _>(2)).unwrap_or(0)),
            max_deliveries: u32::try_from(row.get::<i64, _>(3)).unwrap_or(0),
            ack_floor: u64::try_from(row.get::<i64, _>(4)).unwrap_or(0),
        })
    }
}

pub(crate) enum Command {
    Join {
        patterns: Vec<Pattern>,
        max_in_flight: u32,
        tx: mpsc::Sender<Delivery>,
        failure: Arc<OnceLock<String>>,
        reply: oneshot::Sender<Result<(u64, u64)>>,
    },
    Info(oneshot::Sender<Result<GroupInfo>>),
    Seek {
        floor: u64,
        reply: oneshot::Sender<Result<GroupInfo>>,
    },
    Flush(oneshot::Sender<Result<()>>),
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
}

impl GroupHandle {
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
        let (reply, answer) = oneshot::channel();
        let failure = Arc::new(OnceLock::new());
        self.send(Command::Join {
            patterns: spec.patterns,
            max_in_flight,
            tx,
            failure: failure.clone(),
            reply,
        })
        .await?;
        let (member, start_sequence) = answer.await.map_err(|_| StoreError::ShuttingDown)??;
        Ok(Subscription {
            group: self.name.clone(),
            member_id: member.to_string(),
            created,
            start_sequence,
            auto_ack: spec.auto_ack,
            deliveries,
            failure,
            control: SubscriptionControl {
                member,
                feedback: self.feedback.clone(),
                _membership: Membership::new(member, self.leave.clone()),
            },
        })
    }
}

struct Pending {
    event: Arc<StoredEvent>,
    /// Deliveries made so far.
    attempts: u32,
}

struct InFlight {
    pending: Pending,
    member: u64,
    deadline: Instant,
}

struct Member {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    /// Set before the member is dropped for a damaged log.
    failure: Arc<OnceLock<String>>,
    max_in_flight: u32,
    in_flight: u32,
}

impl Member {
    fn has_room(&self) -> bool {
        self.in_flight < self.max_in_flight
    }
}

/// State changes not yet checkpointed.
#[derive(Default)]
struct Dirty {
    any: bool,
    reset: bool,
    settled: Vec<u64>,
    unredrive: Vec<u64>,
    dead: Vec<DeadRow>,
    /// Parked events' changes, in order.
    parked: Vec<(u64, ParkedChange)>,
}

struct Dispatcher {
    log: Arc<Log>,
    name: String,
    durable: bool,
    /// For a durable group: the store's map, to leave when it retires, and its own
    /// commands sender, to know itself there.
    registry: Option<(Groups, mpsc::Sender<Command>)>,
    /// Set once the group is deleted: nothing more is checkpointed.
    deleted: bool,
    /// Since when the group has been idle.
    idle_since: Option<Instant>,
    patterns: Vec<Pattern>,
    ack_timeout: Duration,
    max_deliveries: u32,

    /// Every sequence up to here is settled.
    floor: u64,
    /// Settled sequences above the floor.
    settled: BTreeSet<u64>,
    /// Every sequence up to here is counted in `selected`.
    scanned: u64,
    /// Events above the floor, up to `scanned`, that the patterns select and that
    /// are not settled: the lag, without the events not yet scanned.
    selected: u64,
    /// Next sequence to read from the log.
    cursor: u64,
    ready: BTreeMap<u64, Pending>,
    in_flight: HashMap<u64, InFlight>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// When each parked event is due again.
    delayed: BTreeSet<(Instant, u64)>,
    /// Events nacked with a delay, by sequence, with their deliveries so far. They
    /// count as settled for the floor (a delay never pins the group's read window);
    /// their aggregate stays busy; due, they are loaded again like redriven dead
    /// letters; they stay here (and in the log's `group_delayed`) until settled.
    parked: HashMap<u64, u32>,
    /// Parked events waiting for their aggregate, whose holder is parked: aggregate
    /// → sequences, delivered one by one, in order, as the aggregate frees.
    blocked: HashMap<String, BTreeSet<u64>>,
    /// Aggregate id → the sequence that holds it until settled.
    busy: HashMap<String, u64>,
    /// Redriven dead letters not yet settled again; `unloaded` still to be read.
    redrive: BTreeSet<u64>,
    unloaded: BTreeSet<u64>,
    dead_count: u64,

    members: Vec<Member>,
    next_member: u64,
    round_robin: usize,
    dirty: Dirty,

    commands: mpsc::Receiver<Command>,
    feedback: mpsc::Receiver<(u64, Feedback)>,
    leave: mpsc::UnboundedReceiver<u64>,
}

/// The receiving ends of a dispatcher's channels.
struct Inboxes {
    commands: mpsc::Receiver<Command>,
    feedback: mpsc::Receiver<(u64, Feedback)>,
    leave: mpsc::UnboundedReceiver<u64>,
}

fn channels(name: &str) -> (GroupHandle, Inboxes) {
    let (commands, commands_rx) = mpsc::channel(64);
    let (feedback, feedback_rx) = mpsc::channel(4096);
    let (leave, leave_rx) = mpsc::unbounded_channel();
    let handle = GroupHandle {
        name: name.to_owned(),
        commands,
        feedback,
        leave,
    };
    let inboxes = Inboxes {
        commands: commands_rx,
        feedback: feedback_rx,
        leave: leave_rx,
    };
    (handle, inboxes)
}

impl Dispatcher {
    fn new(log: Arc<Log>, row: GroupRow, durable: bool) -> (Self, GroupHandle) {
        let (
            handle,
            Inboxes {
                commands,
                feedback,
                leave,
            },
        ) = channels(&row.name);
        let dispatcher = Self {
            log,
            name: row.name,
            durable,
            registry: None,
            deleted: false,
            idle_since: None,
            patterns: row.patterns,
            ack_timeout: row.ack_timeout,
            max_deliveries: row.max_deliveries,
            floor: row.ack_floor,
            settled: BTreeSet::new(),
            scanned: row.ack_floor,
            selected: 0,
            cursor: row.ack_floor + 1,
            ready: BTreeMap::new(),
            in_flight: HashMap::new(),
            deadlines: BTreeSet::new(),
            delayed: BTreeSet::new(),
            parked: HashMap::new(),
            blocked: HashMap::new(),
            busy: HashMap::new(),
            redrive: BTreeSet::new(),
            unloaded: BTreeSet::new(),
            dead_count: 0,
            members: Vec::new(),
            next_member: 1,
            round_robin: 0,
            dirty: Dirty::default(),
            commands,
            feedback,
            leave,
        };
        (dispatcher, handle)
    }
}

pub(crate) async fn spawn_durable(
    log: Arc<Log>,
    row: GroupRow,
    groups: Groups,
) -> Result<(GroupHandle, JoinHandle<()>)> {
    let (settled, redrive) = log.group_sets(&row.name).await?;
    let dead_count = log.dead_letter_count(&row.name).await?;
    let (mut dispatcher, handle) = Dispatcher::new(log, row, true);
    dispatcher.registry = Some((groups, handle.commands.clone()));
    dispatcher.settled = settled
        .into_iter()
        .filter(|&s| s > dispatcher.floor)
        .collect();
    dispatcher.unloaded = redrive.iter().copied().collect();
    dispatcher.redrive = redrive.into_iter().collect();
    dispatcher.dead_count = dead_count;
    let now = SystemTime::now();
    for parked in dispatcher.log.group_delayed(&dispatcher.name).await? {
        dispatcher.parked.insert(parked.sequence, parked.attempts);
        match parked.due {
            Some(due) => {
                let wait = due.duration_since(now).unwrap_or(Duration::ZERO);
                dispatcher.delayed.insert((after(wait), parked.sequence));
                if !parked.aggregate_id.is_empty() {
                    dispatcher.busy.insert(parked.aggregate_id, parked.sequence);
                }
            }
            None => {
                dispatcher
                    .blocked
                    .entry(parked.aggregate_id)
                    .or_default()
                    .insert(parked.sequence);
            }
        }
    }
    // Blocked events whose holder was settled before the stop go next.
    let free: Vec<String> = dispatcher
        .blocked
        .keys()
        .filter(|a| !dispatcher.busy.contains_key(*a))
        .cloned()
        .collect();
    for aggregate in free {
        dispatcher.unblock(&aggregate);
    }
    Ok((handle, tokio::spawn(dispatcher.run())))
}

pub(crate) fn spawn_ephemeral(
    log: Arc<Log>,
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

impl Dispatcher {
    async fn run(mut self) {
        let mut shutdown = self.log.watch_shutdown();
        let mut head = self.log.watch_head();
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            if let Err(e) = self.fill().await {
                if e.is_corruption() {
                    self.fail_members(&e);
                    if !self.durable {
                        break;
                    }
                } else {
                    tracing::error!(group = %self.name, error = %e, "reading the log");
                }
            }
            self.dispatch();
            if self.deleted {
                self.forget().await;
                return;
            }
            let wake = self.next_wake();
            self.idle_since = if self.idle() {
                self.idle_since.or_else(|| Some(Instant::now()))
            } else {
                None
            };
            let retire_at = self.idle_since.map(|at| at + self.log.idle_group_exit);
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
                    while let Ok((member, feedback)) = self.feedback.try_recv() {
                        self.on_feedback(member, feedback);
                    }
                    self.leave_member(member);
                    if !self.durable && self.members.is_empty() {
                        break;
                    }
                }
                Some((member, feedback)) = self.feedback.recv() => {
                    self.on_feedback(member, feedback);
                    for _ in 0..FEEDBACK_BATCH {
                        match self.feedback.try_recv() {
                            Ok((member, feedback)) => self.on_feedback(member, feedback),
                            Err(_) => break,
                        }
                    }
                }
                Some(command) = self.commands.recv() => self.on_command(command).await,
                Ok(()) = head.changed(), if self.wants_events() => {}
                () = sleep_until(wake), if wake.is_some() => self.expire(),
                _ = tick.tick() => {
                    if let Err(e) = self.checkpoint(None).await {
                        tracing::error!(group = %self.name, error = %e, "checkpoint");
                    }
                }
            }
        }
        // Acks that arrived before the stop count.
        while let Ok((member, feedback)) = self.feedback.try_recv() {
            self.on_feedback(member, feedback);
        }
        if let Err(e) = self.checkpoint(None).await {
            tracing::error!(group = %self.name, error = %e, "final checkpoint");
        }
    }

    /// A durable group with no member and nothing timed: its state is all in the
    /// log, so it needs no task until someone asks for it again.
    fn idle(&self) -> bool {
        self.registry.is_some()
            && self.members.is_empty()
            && self.delayed.is_empty()
            && self.in_flight.is_empty()
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
            tracing::error!(group = %self.name, error = %e, "checkpoint before retiring; staying");
            return false;
        }
        forget(&mut map, &self.name, &own);
        self.commands.close();
        drop(map);
        tracing::debug!(group = %self.name, "idle group retired");
        true
    }

    /// Leaves the store's map, when it still names this dispatcher.
    async fn forget(&self) {
        if let Some((groups, own)) = &self.registry {
            forget(&mut *groups.lock().await, &self.name, own);
        }
    }

    fn wants_events(&self) -> bool {
        !self.members.is_empty()
            && self.ready.len() < READY_MAX
            && self.cursor - self.floor <= SPAN_MAX
    }

    fn next_wake(&self) -> Option<Instant> {
        let deadline = self.deadlines.first().map(|d| d.0);
        let delayed = self.delayed.first().map(|d| d.0);
        match (deadline, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Loads redriven dead letters and new events from the log into `ready`.
    async fn fill(&mut self) -> Result<()> {
        if self.members.is_empty() {
            return Ok(());
        }
        while self.ready.len() < READY_MAX {
            let Some(seq) = self.unloaded.pop_first() else {
                break;
            };
            match self.log.read_one(seq).await? {
                Some(event) => {
                    let attempts = self.parked.get(&seq).copied().unwrap_or(0);
                    self.ready.insert(seq, Pending { event, attempts });
                }
                None => self.settle(seq, false),
            }
        }
        while self.wants_events() && self.cursor <= self.log.head() {
            let batch = self.log.read_from(self.cursor, READ_BATCH).await?;
            let Some(last) = batch.last() else { break };
            self.cursor = last.sequence + 1;
            for event in batch {
                let seq = event.sequence;
                let selects = self.selects(&event);
                self.count(seq, selects);
                if self.settled.contains(&seq)
                    || self.ready.contains_key(&seq)
                    || self.in_flight.contains_key(&seq)
                    || self.parked.contains_key(&seq)
                {
                    continue;
                }
                if selects {
                    self.ready.insert(seq, Pending { event, attempts: 0 });
                } else {
                    self.settle(seq, false);
                }
            }
        }
        Ok(())
    }

    fn selects(&self, event: &StoredEvent) -> bool {
        let e = &event.event;
        self.patterns
            .iter()
            .any(|p| p.matches(&e.r#type, &e.schema_version))
    }

    /// Counts an event read from the log for the lag, once.
    fn count(&mut self, seq: u64, selects: bool) {
        self.scanned = self.scanned.max(self.floor);
        if seq <= self.scanned {
            return;
        }
        if selects && !self.settled.contains(&seq) {
            self.selected += 1;
        }
        self.scanned = seq;
    }

    /// Counts the events up to the head that no member has read yet, up to
    /// `LAG_SCAN_MAX` of them.
    async fn count_lag(&mut self) -> Result<()> {
        let head = self.log.head();
        let mut budget = LAG_SCAN_MAX;
        while self.scanned.max(self.floor) < head && budget > 0 {
            let from = self.scanned.max(self.floor) + 1;
            let batch = self.log.read_from(from, READ_BATCH).await?;
            let Some(last) = batch.last().map(|e| e.sequence) else {
                break;
            };
            for event in &batch {
                self.count(event.sequence, self.selects(event));
            }
            self.scanned = self.scanned.max(last);
            budget = budget.saturating_sub(batch.len());
        }
        Ok(())
    }

    /// Hands ready events to members with room, oldest first, holding back an
    /// event while its aggregate is busy with an earlier one.
    fn dispatch(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let mut room: u64 = self
            .members
            .iter()
            .map(|m| u64::from(m.max_in_flight.saturating_sub(m.in_flight)))
            .sum();
        if room == 0 {
            return;
        }
        let mut chosen = Vec::new();
        let mut to_block = Vec::new();
        {
            let mut claimed: HashSet<&str> = HashSet::new();
            for (&seq, pending) in &self.ready {
                if room == 0 {
                    break;
                }
                let aggregate = pending.event.event.aggregate_id.as_str();
                if !aggregate.is_empty() {
                    if let Some(&holder) = self.busy.get(aggregate)
                        && holder != seq
                    {
                        // Held by a parked event (or behind blocked ones): set aside
                        // rather than pin the window for as long as the delay lasts.
                        if self.parked.contains_key(&holder)
                            || self
                                .blocked
                                .get(aggregate)
                                .is_some_and(|w| w.first().is_some_and(|&first| first < seq))
                        {
                            to_block.push(seq);
                        }
                        continue;
                    }
                    if !claimed.insert(aggregate) {
                        continue;
                    }
                }
                chosen.push(seq);
                room -= 1;
            }
        }
        for seq in to_block {
            if let Some(pending) = self.ready.remove(&seq) {
                self.block(pending);
            }
        }
        for seq in chosen {
            if let Some(pending) = self.ready.remove(&seq)
                && let Err(pending) = self.deliver(pending)
            {
                self.ready.insert(seq, pending);
            }
        }
    }

    fn deliver(&mut self, mut pending: Pending) -> Result<(), Pending> {
        let n = self.members.len();
        for i in 0..n {
            let index = (self.round_robin + i) % n;
            let member = &mut self.members[index];
            if !member.has_room() {
                continue;
            }
            let delivery = Delivery {
                event: pending.event.clone(),
                attempt: pending.attempts + 1,
            };
            // A full channel holds deliveries from before a seek; try the next member.
            if member.tx.try_send(delivery).is_err() {
                continue;
            }
            member.in_flight += 1;
            let member_id = member.id;
            self.round_robin = (index + 1) % n;
            pending.attempts += 1;
            let seq = pending.event.sequence;
            let aggregate = &pending.event.event.aggregate_id;
            if !aggregate.is_empty() {
                self.busy.insert(aggregate.clone(), seq);
            }
            let deadline = after(self.ack_timeout);
            self.deadlines.insert((deadline, seq));
            self.in_flight.insert(
                seq,
                InFlight {
                    pending,
                    member: member_id,
                    deadline,
                },
            );
            return Ok(());
        }
        Err(pending)
    }

    fn take_in_flight(&mut self, seq: u64) -> Option<Pending> {
        let flight = self.in_flight.remove(&seq)?;
        self.deadlines.remove(&(flight.deadline, seq));
        if let Some(member) = self.members.iter_mut().find(|m| m.id == flight.member) {
            member.in_flight = member.in_flight.saturating_sub(1);
        }
        Some(flight.pending)
    }

    fn on_feedback(&mut self, _member: u64, feedback: Feedback) {
        match feedback {
            Feedback::Ack(sequences) => {
                for seq in sequences {
                    if let Some(pending) = self.take_in_flight(seq) {
                        self.release(&pending);
                        self.settle(seq, true);
                    }
                }
            }
            Feedback::Nack {
                sequences,
                delay,
                reason,
            } => {
                let reason = if reason.is_empty() {
                    "nacked".to_owned()
                } else {
                    reason
                };
                for seq in sequences {
                    if let Some(pending) = self.take_in_flight(seq) {
                        self.retry(pending, &reason, delay);
                    }
                }
            }
        }
    }

    /// Frees the event's aggregate for the next event.
    fn release(&mut self, pending: &Pending) {
        let aggregate = &pending.event.event.aggregate_id;
        if self.busy.get(aggregate) == Some(&pending.event.sequence) {
            self.busy.remove(aggregate);
            self.unblock(aggregate);
        }
    }

    /// The aggregate is free: its first blocked event holds it next, loaded again.
    fn unblock(&mut self, aggregate: &str) {
        let Some(waiting) = self.blocked.get_mut(aggregate) else {
            return;
        };
        if let Some(next) = waiting.pop_first() {
            self.busy.insert(aggregate.to_owned(), next);
            self.unloaded.insert(next);
        }
        if waiting.is_empty() {
            self.blocked.remove(aggregate);
        }
    }

    /// A failed delivery: again after `delay`, or to the dead letters once the
    /// group's deliveries are used up.
    fn retry(&mut self, pending: Pending, reason: &str, delay: Duration) {
        let seq = pending.event.sequence;
        if self.max_deliveries > 0 && pending.attempts >= self.max_deliveries {
            self.dead_letter(pending, reason);
        } else if delay.is_zero() {
            self.ready.insert(seq, pending);
        } else {
            self.park(pending, delay);
        }
    }

    /// Sets a nacked event aside until `delay` has passed: settled for the floor,
    /// its aggregate still held, persisted with the group's next checkpoint.
    fn park(&mut self, pending: Pending, delay: Duration) {
        let seq = pending.event.sequence;
        let was_parked = self.parked.contains_key(&seq);
        self.settle(seq, true);
        self.parked.insert(seq, pending.attempts);
        let due = SystemTime::now() + delay;
        self.delayed.insert((after(delay), seq));
        if self.durable {
            self.dirty.any = true;
            self.dirty.parked.push((
                seq,
                ParkedChange::Set {
                    due: Some(due),
                    attempts: pending.attempts,
                },
            ));
        }
        if !was_parked {
            tracing::debug!(group = %self.name, sequence = seq, ?delay, "parked");
        }
    }

    /// Sets aside an event whose aggregate is held by a parked event, so that it
    /// does not pin the group's read window; it comes back when the aggregate frees.
    fn block(&mut self, pending: Pending) {
        let seq = pending.event.sequence;
        self.settle(seq, true);
        self.parked.insert(seq, pending.attempts);
        self.blocked
            .entry(pending.event.event.aggregate_id.clone())
            .or_default()
            .insert(seq);
        if self.durable {
            self.dirty.any = true;
            self.dirty.parked.push((
                seq,
                ParkedChange::Set {
                    due: None,
                    attempts: pending.attempts,
                },
            ));
        }
    }

    fn dead_letter(&mut self, pending: Pending, reason: &str) {
        let seq = pending.event.sequence;
        self.release(&pending);
        if self.durable {
            tracing::warn!(group = %self.name, sequence = seq, attempts = pending.attempts, reason, "dead letter");
            self.dirty.dead.push(DeadRow {
                sequence: seq,
                attempts: pending.attempts,
                reason: reason.to_owned(),
                dead_at: SystemTime::now(),
            });
            self.dead_count += 1;
        } else {
            tracing::warn!(group = %self.name, sequence = seq, attempts = pending.attempts, reason, "dropped after max deliveries");
        }
        self.settle(seq, true);
    }

    /// Marks `seq` settled; `selected` when the group's patterns select it (it was
    /// delivered), so that it leaves the lag.
    fn settle(&mut self, seq: u64, selected: bool) {
        self.dirty.any = true;
        if self.redrive.remove(&seq) {
            self.dirty.unredrive.push(seq);
        }
        if self.parked.remove(&seq).is_some() && self.durable {
            self.dirty.parked.push((seq, ParkedChange::Cleared));
        }
        if seq <= self.floor {
            return;
        }
        let fresh = if seq == self.floor + 1 {
            self.floor = seq;
            while self.settled.remove(&(self.floor + 1)) {
                self.floor += 1;
            }
            true
        } else if self.settled.insert(seq) {
            self.dirty.settled.push(seq);
            true
        } else {
            false
        };
        if fresh && selected && seq <= self.scanned {
            self.selected = self.selected.saturating_sub(1);
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(at, seq)) = self.deadlines.first() {
            if at > now {
                break;
            }
            if let Some(pending) = self.take_in_flight(seq) {
                let reason = format!("no ack within {:?}", self.ack_timeout);
                self.retry(pending, &reason, Duration::ZERO);
            } else {
                self.deadlines.pop_first();
            }
        }
        while let Some(&(at, seq)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            if self.parked.contains_key(&seq) {
                self.unloaded.insert(seq);
            }
        }
    }

    /// The log is damaged where the group reads: every member's subscription ends
    /// with the reason (DATA_LOSS), rather than stalling. What they held goes back
    /// to be delivered again; a seek past the damage lets members in again.
    fn fail_members(&mut self, error: &StoreError) {
        tracing::error!(group = %self.name, error = %error, cursor = self.cursor, "the log is damaged where this group reads; ending its subscriptions");
        let reason = format!(
            "the log is damaged at or after sequence {}: {error}; restore evmesh.db from a backup, or seek the group past it",
            self.cursor
        );
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for member in &self.members {
            let _ = member.failure.set(reason.clone());
        }
        for id in ids {
            self.leave_member(id);
        }
    }

    fn leave_member(&mut self, member: u64) {
        self.members.retain(|m| m.id != member);
        let held: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.member == member)
            .map(|(&seq, _)| seq)
            .collect();
        for seq in held {
            if let Some(pending) = self.take_in_flight(seq) {
                self.retry(pending, "member disconnected", Duration::ZERO);
            }
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Join {
                patterns,
                max_in_flight,
                tx,
                failure,
                reply,
            } => {
                let _ = reply.send(self.join(patterns, max_in_flight, tx, failure));
            }
            Command::Info(reply) => {
                let _ = reply.send(self.info().await);
            }
            Command::Seek { floor, reply } => {
                self.seek(floor);
                let result = match self.flush().await {
                    Ok(()) => self.info().await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::Flush(reply) => {
                let _ = reply.send(self.flush().await);
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

    fn join(
        &mut self,
        patterns: Vec<Pattern>,
        max_in_flight: u32,
        tx: mpsc::Sender<Delivery>,
        failure: Arc<OnceLock<String>>,
    ) -> Result<(u64, u64)> {
        if patterns != self.patterns {
            if !self.members.is_empty() {
                return Err(StoreError::FailedPrecondition(format!(
                    "group {:?} is consuming [{}] with {} live member(s); a member with other patterns must wait until they leave",
                    self.name,
                    GroupRow::patterns_sql(&self.patterns).replace('\n', ", "),
                    self.members.len()
                )));
            }
            if self.durable {
                let op = WriteOp::UpdatePatterns {
                    group: self.name.clone(),
                    patterns: patterns.clone(),
                };
                // Best effort: the next checkpoint's writer is the same queue.
                if self.log.writer.try_send(op).is_err() {
                    return Err(StoreError::ShuttingDown);
                }
            }
            tracing::info!(group = %self.name, "group patterns changed");
            self.patterns = patterns;
            self.recount();
        }
        let id = self.next_member;
        self.next_member += 1;
        self.members.push(Member {
            id,
            tx,
            failure,
            max_in_flight,
            in_flight: 0,
        });
        Ok((id, self.floor + 1))
    }

    /// Counts the lag again from the floor, at the next info.
    fn recount(&mut self) {
        self.scanned = self.floor;
        self.selected = 0;
    }

    async fn info(&mut self) -> Result<GroupInfo> {
        self.count_lag().await?;
        let head = self.log.head();
        let unscanned = head.saturating_sub(self.scanned.max(self.floor));
        Ok(GroupInfo {
            name: self.name.clone(),
            patterns: self
                .patterns
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            ack_floor: self.floor,
            lag: self.selected
                + unscanned
                + self.redrive.len() as u64
                + self
                    .parked
                    .keys()
                    .filter(|s| !self.redrive.contains(s))
                    .count() as u64,
            pending: (self.in_flight.len() + self.delayed.len()) as u64,
            dead_letters: self.dead_count,
            members: u32::try_from(self.members.len()).unwrap_or(u32::MAX),
            ack_timeout: self.ack_timeout,
            max_deliveries: self.max_deliveries,
            head_sequence: head,
        })
    }

    fn seek(&mut self, floor: u64) {
        self.floor = floor;
        self.cursor = floor + 1;
        self.settled.clear();
        self.recount();
        self.ready.clear();
        self.in_flight.clear();
        self.deadlines.clear();
        self.delayed.clear();
        self.parked.clear();
        self.blocked.clear();
        self.busy.clear();
        self.unloaded = self.redrive.clone();
        for member in &mut self.members {
            member.in_flight = 0;
        }
        self.dirty.settled.clear();
        self.dirty.parked.clear();
        self.dirty.reset = true;
        self.dirty.any = true;
        tracing::info!(group = %self.name, floor, "group seeked");
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
        if !self.dirty.any && reply.is_none() {
            return Ok(());
        }
        let dirty = std::mem::take(&mut self.dirty);
        let checkpoint = Checkpoint {
            group: self.name.clone(),
            floor: self.floor,
            reset: dirty.reset,
            settled: dirty.settled,
            unredrive: dirty.unredrive,
            dead: dirty.dead,
            parked: dirty.parked,
            reply,
        };
        self.log.write(WriteOp::Checkpoint(checkpoint)).await
    }

    async fn redrive(&mut self, sequences: Vec<u64>) -> Result<u64> {
        self.flush().await?;
        let (reply, done) = oneshot::channel();
        self.log
            .write(WriteOp::Redrive {
                group: self.name.clone(),
                sequences,
                reply,
            })
            .await?;
        let moved = done.await.map_err(|_| StoreError::ShuttingDown)??;
        self.dead_count = self.dead_count.saturating_sub(moved.len() as u64);
        for &seq in &moved {
            self.redrive.insert(seq);
            self.unloaded.insert(seq);
        }
        tracing::info!(group = %self.name, count = moved.len(), "dead letters redriven");
        Ok(moved.len() as u64)
    }

    async fn delete(&mut self) -> Result<u64> {
        if !self.members.is_empty() {
            return Err(StoreError::FailedPrecondition(format!(
                "group {:?} has {} live member(s); a group is deleted once they leave",
                self.name,
                self.members.len()
            )));
        }
        let (reply, done) = oneshot::channel();
        self.log
            .write(WriteOp::DeleteGroup {
                group: self.name.clone(),
                reply,
            })
            .await?;
        let dead = done.await.map_err(|_| StoreError::ShuttingDown)??;
        // Deleted: no checkpoint may write it again; a closed channel tells the
        // store to start afresh for this name, and the run loop leaves its map.
        self.deleted = true;
        self.dirty = Dirty::default();
        self.commands.close();
        tracing::info!(group = %self.name, dead_letters = dead, "group deleted");
        Ok(dead)
    }

    async fn purge(&mut self, sequences: Vec<u64>) -> Result<u64> {
        self.flush().await?;
        let (reply, done) = oneshot::channel();
        self.log
            .write(WriteOp::Purge {
                group: self.name.clone(),
                sequences,
                reply,
            })
            .await?;
        let purged = done.await.map_err(|_| StoreError::ShuttingDown)??;
        self.dead_count = self.dead_count.saturating_sub(purged);
        tracing::info!(group = %self.name, count = purged, "dead letters purged");
        Ok(purged)
    }
}

/// `d` from now. The node bounds ack timeouts and nack delays, but a group stored by
/// an older node may hold any: a time past what an `Instant` holds is a day away, to
/// be seen again then, never a panic.
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(24 * 60 * 60)))
        .unwrap_or(now)
}

fn forget(map: &mut HashMap<String, GroupHandle>, name: &str, own: &mpsc::Sender<Command>) {
    if map.get(name).is_some_and(|h| h.is(own)) {
        map.remove(name);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
