//! Group dispatch, the part every backend shares: what is ready, in flight, waiting
//! for a retry or for its aggregate, settled, and which member gets what. A state
//! machine that does no I/O: its backend feeds it events from its log and the
//! members' acks and nacks, tells it the time, and persists the [`Changes`] it
//! hands back (the group task in `task.rs` does, over each backend's log).
//! Deliveries go out through each member's [`Outlet`], which never waits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{Delivery, Feedback, GroupInfo, GroupTally, Pattern, Result, StoreError, StoredEvent};

/// Events loaded and waiting for a member with room.
pub(crate) const READY_MAX: usize = 1024;
/// How far past the ack floor a group reads: one stuck event holds back at most this
/// many, which bounds the settled set kept above the floor.
pub(crate) const SPAN_MAX: u64 = 1 << 16;

/// Where a member's deliveries go: taken at once, or handed back when full (a full
/// member's deliveries from before a seek, say), so that dispatch never waits.
pub(crate) trait Outlet {
    fn offer(&self, delivery: Delivery) -> Result<(), Delivery>;
}

impl Outlet for mpsc::Sender<Delivery> {
    fn offer(&self, delivery: Delivery) -> Result<(), Delivery> {
        self.try_send(delivery).map_err(|e| match e {
            mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
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

struct Member<O> {
    id: u64,
    outlet: O,
    /// Set before the member is dropped for a damaged log.
    failure: Arc<OnceLock<String>>,
    max_in_flight: u32,
    in_flight: u32,
}

impl<O> Member<O> {
    fn has_room(&self) -> bool {
        self.in_flight < self.max_in_flight
    }
}

/// What became of a parked event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParkedChange {
    /// Set aside until `due` (or, `None`, until its aggregate frees), after
    /// `attempts` deliveries.
    Set {
        due: Option<SystemTime>,
        attempts: u32,
        /// The aggregate it holds or waits for.
        aggregate_id: String,
    },
    /// Settled for good.
    Cleared,
}

/// An event that used up the group's deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadRow {
    pub sequence: u64,
    pub attempts: u32,
    pub reason: String,
    pub dead_at: SystemTime,
}

/// A parked event as persisted, to restore at start.
pub(crate) struct ParkedRow {
    pub sequence: u64,
    /// `None`: waits for its aggregate to free.
    pub due: Option<SystemTime>,
    pub attempts: u32,
    pub aggregate_id: String,
}

/// State changes not yet persisted: what a durable group's backend writes at its
/// next checkpoint.
#[derive(Default, Clone)]
pub(crate) struct Changes {
    pub any: bool,
    /// Forget every settled sequence above the floor first (a seek).
    pub reset: bool,
    pub settled: Vec<u64>,
    pub unredrive: Vec<u64>,
    pub dead: Vec<DeadRow>,
    /// Parked events' changes, in order.
    pub parked: Vec<(u64, ParkedChange)>,
}

/// A group's configuration.
#[derive(Debug, Clone)]
pub(crate) struct GroupConfig {
    pub name: String,
    /// A durable group records its changes; an ephemeral one keeps none.
    pub durable: bool,
    pub patterns: Vec<Pattern>,
    pub ack_timeout: Duration,
    pub max_deliveries: u32,
}

/// One group's dispatch state.
pub(crate) struct Core<O> {
    config: GroupConfig,
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
    /// letters; they stay here (and persisted) until settled.
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

    members: Vec<Member<O>>,
    next_member: u64,
    round_robin: usize,
    changes: Changes,
    tally: Arc<GroupTally>,
}

/// `d` after `now`. The node bounds ack timeouts and nack delays, but a group stored
/// by an older node may hold any: a time past what an `Instant` holds is a day away,
/// to be seen again then, never a panic.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(24 * 60 * 60)))
        .unwrap_or(now)
}

impl<O: Outlet> Core<O> {
    /// A group whose every sequence up to `floor` is settled.
    pub(crate) fn new(config: GroupConfig, floor: u64) -> Self {
        Self {
            config,
            floor,
            settled: BTreeSet::new(),
            scanned: floor,
            selected: 0,
            cursor: floor + 1,
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
            changes: Changes::default(),
            tally: Arc::default(),
        }
    }

    /// Counts into `tally` (the store's, for this group) from now on.
    pub(crate) fn count_into(&mut self, tally: Arc<GroupTally>) {
        self.tally = tally;
    }

    /// A durable group's persisted state: settled sequences above the floor,
    /// redriven dead letters, how many dead letters it has, and its parked events.
    pub(crate) fn restore(
        &mut self,
        settled: Vec<u64>,
        redrive: Vec<u64>,
        dead_count: u64,
        parked: Vec<ParkedRow>,
        now: Instant,
    ) {
        self.settled = settled.into_iter().filter(|&s| s > self.floor).collect();
        self.unloaded = redrive.iter().copied().collect();
        self.redrive = redrive.into_iter().collect();
        self.dead_count = dead_count;
        let wall = SystemTime::now();
        for parked in parked {
            self.parked.insert(parked.sequence, parked.attempts);
            match parked.due {
                Some(due) => {
                    let wait = due.duration_since(wall).unwrap_or(Duration::ZERO);
                    self.delayed.insert((after(now, wait), parked.sequence));
                    if !parked.aggregate_id.is_empty() {
                        self.busy.insert(parked.aggregate_id, parked.sequence);
                    }
                }
                None => {
                    self.blocked
                        .entry(parked.aggregate_id)
                        .or_default()
                        .insert(parked.sequence);
                }
            }
        }
        // Blocked events whose holder was settled before the stop go next.
        let free: Vec<String> = self
            .blocked
            .keys()
            .filter(|a| !self.busy.contains_key(*a))
            .cloned()
            .collect();
        for aggregate in free {
            self.unblock(&aggregate);
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    /// The next sequence to read from the log.
    pub(crate) fn cursor(&self) -> u64 {
        self.cursor
    }

    pub(crate) fn has_members(&self) -> bool {
        !self.members.is_empty()
    }

    pub(crate) fn member_count(&self) -> usize {
        self.members.len()
    }

    /// No member, nothing in flight and nothing timed: a durable group's state is
    /// all persisted then.
    pub(crate) fn is_idle(&self) -> bool {
        self.members.is_empty() && self.delayed.is_empty() && self.in_flight.is_empty()
    }

    /// Whether to read new events from the log: a member to give them to, room in
    /// the ready queue, and the read window not past its span.
    pub(crate) fn wants_events(&self) -> bool {
        !self.members.is_empty()
            && self.ready.len() < READY_MAX
            && self.cursor - self.floor <= SPAN_MAX
    }

    /// The next event to load again (redriven, or parked and due), when a member
    /// waits and the ready queue has room.
    pub(crate) fn next_to_load(&mut self) -> Option<u64> {
        if self.members.is_empty() || self.ready.len() >= READY_MAX {
            return None;
        }
        self.unloaded.pop_first()
    }

    /// An event loaded again, or `None` when the log no longer has it.
    pub(crate) fn loaded(&mut self, seq: u64, event: Option<Arc<StoredEvent>>) {
        match event {
            Some(event) => {
                let attempts = self.parked.get(&seq).copied().unwrap_or(0);
                self.ready.insert(seq, Pending { event, attempts });
            }
            None => self.settle(seq, false),
        }
    }

    /// An event read from the log at the cursor: counted for the lag, and ready
    /// when the patterns select it and nothing else holds it.
    pub(crate) fn read(&mut self, event: Arc<StoredEvent>) {
        let seq = event.sequence;
        self.cursor = self.cursor.max(seq + 1);
        let selects = self.selects(&event);
        self.count(seq, selects);
        if self.settled.contains(&seq)
            || self.ready.contains_key(&seq)
            || self.in_flight.contains_key(&seq)
            || self.parked.contains_key(&seq)
        {
            return;
        }
        if selects {
            self.ready.insert(seq, Pending { event, attempts: 0 });
        } else {
            self.settle(seq, false);
        }
    }

    /// When the group next has something timed to do: an ack deadline, or a parked
    /// event due.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let deadline = self.deadlines.first().map(|d| d.0);
        let delayed = self.delayed.first().map(|d| d.0);
        match (deadline, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn selects(&self, event: &StoredEvent) -> bool {
        let e = &event.event;
        self.config
            .patterns
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

    /// Where counting the lag goes on from: the first sequence not counted yet.
    pub(crate) fn unscanned_from(&self) -> u64 {
        self.scanned.max(self.floor) + 1
    }

    /// Counts events read for the lag alone (no member has read them yet).
    pub(crate) fn scan(&mut self, events: &[Arc<StoredEvent>]) {
        for event in events {
            let selects = self.selects(event);
            self.count(event.sequence, selects);
        }
        if let Some(last) = events.last() {
            self.scanned = self.scanned.max(last.sequence);
        }
    }

    /// Hands ready events to members with room, oldest first, holding back an
    /// event while its aggregate is busy with an earlier one.
    pub(crate) fn dispatch(&mut self, now: Instant) {
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
                && let Err(pending) = self.deliver(pending, now)
            {
                self.ready.insert(seq, pending);
            }
        }
    }

    fn deliver(&mut self, mut pending: Pending, now: Instant) -> Result<(), Pending> {
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
            // A full outlet holds deliveries from before a seek; try the next member.
            if member.outlet.offer(delivery).is_err() {
                continue;
            }
            member.in_flight += 1;
            let member_id = member.id;
            self.round_robin = (index + 1) % n;
            GroupTally::add(&self.tally.delivered, 1);
            if pending.attempts > 0 {
                GroupTally::add(&self.tally.redelivered, 1);
            }
            pending.attempts += 1;
            let seq = pending.event.sequence;
            let aggregate = &pending.event.event.aggregate_id;
            if !aggregate.is_empty() {
                self.busy.insert(aggregate.clone(), seq);
            }
            let deadline = after(now, self.config.ack_timeout);
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

    /// A member's acks or nacks.
    pub(crate) fn feedback(&mut self, feedback: Feedback, now: Instant) {
        match feedback {
            Feedback::Ack(sequences) => {
                for seq in sequences {
                    if let Some(pending) = self.take_in_flight(seq) {
                        GroupTally::add(&self.tally.acked, 1);
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
                        GroupTally::add(&self.tally.nacked, 1);
                        self.retry(pending, &reason, delay, now);
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
    fn retry(&mut self, pending: Pending, reason: &str, delay: Duration, now: Instant) {
        let seq = pending.event.sequence;
        if self.config.max_deliveries > 0 && pending.attempts >= self.config.max_deliveries {
            self.dead_letter(pending, reason);
        } else if delay.is_zero() {
            self.ready.insert(seq, pending);
        } else {
            self.park(pending, delay, now);
        }
    }

    /// Sets a nacked event aside until `delay` has passed: settled for the floor,
    /// its aggregate still held, persisted with the group's next changes.
    fn park(&mut self, pending: Pending, delay: Duration, now: Instant) {
        let seq = pending.event.sequence;
        let was_parked = self.parked.contains_key(&seq);
        self.settle(seq, true);
        self.parked.insert(seq, pending.attempts);
        let due = SystemTime::now() + delay;
        self.delayed.insert((after(now, delay), seq));
        if self.config.durable {
            self.changes.any = true;
            self.changes.parked.push((
                seq,
                ParkedChange::Set {
                    due: Some(due),
                    attempts: pending.attempts,
                    aggregate_id: pending.event.event.aggregate_id.clone(),
                },
            ));
        }
        if !was_parked {
            tracing::debug!(group = %self.config.name, sequence = seq, ?delay, "parked");
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
        if self.config.durable {
            self.changes.any = true;
            self.changes.parked.push((
                seq,
                ParkedChange::Set {
                    due: None,
                    attempts: pending.attempts,
                    aggregate_id: pending.event.event.aggregate_id.clone(),
                },
            ));
        }
    }

    fn dead_letter(&mut self, pending: Pending, reason: &str) {
        let seq = pending.event.sequence;
        GroupTally::add(&self.tally.dead_lettered, 1);
        self.release(&pending);
        if self.config.durable {
            tracing::warn!(group = %self.config.name, sequence = seq, attempts = pending.attempts, reason, "dead letter");
            self.changes.dead.push(DeadRow {
                sequence: seq,
                attempts: pending.attempts,
                reason: reason.to_owned(),
                dead_at: SystemTime::now(),
            });
            self.dead_count += 1;
        } else {
            tracing::warn!(group = %self.config.name, sequence = seq, attempts = pending.attempts, reason, "dropped after max deliveries");
        }
        self.settle(seq, true);
    }

    /// Marks `seq` settled; `selected` when the group's patterns select it (it was
    /// delivered), so that it leaves the lag.
    fn settle(&mut self, seq: u64, selected: bool) {
        self.changes.any = true;
        if self.redrive.remove(&seq) {
            self.changes.unredrive.push(seq);
        }
        if self.parked.remove(&seq).is_some() && self.config.durable {
            self.changes.parked.push((seq, ParkedChange::Cleared));
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
            self.changes.settled.push(seq);
            true
        } else {
            false
        };
        if fresh && selected && seq <= self.scanned {
            self.selected = self.selected.saturating_sub(1);
        }
    }

    /// Deliveries whose ack deadline passed go back to be delivered again (or dead
    /// lettered); parked events now due are loaded again.
    pub(crate) fn expire(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.deadlines.first() {
            if at > now {
                break;
            }
            if let Some(pending) = self.take_in_flight(seq) {
                let reason = format!("no ack within {:?}", self.config.ack_timeout);
                self.retry(pending, &reason, Duration::ZERO, now);
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

    /// Every member's subscription ends with `reason`; what they held goes back to
    /// be delivered again.
    pub(crate) fn fail_members(&mut self, reason: &str, now: Instant) {
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for member in &self.members {
            let _ = member.failure.set(reason.to_owned());
        }
        for id in ids {
            self.leave(id, now);
        }
    }

    /// A member is gone: what it held goes back to be delivered again.
    pub(crate) fn leave(&mut self, member: u64, now: Instant) {
        self.members.retain(|m| m.id != member);
        let held: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.member == member)
            .map(|(&seq, _)| seq)
            .collect();
        for seq in held {
            if let Some(pending) = self.take_in_flight(seq) {
                self.retry(pending, "member disconnected", Duration::ZERO, now);
            }
        }
    }

    /// Whether a member with `patterns` changes the group's patterns; an error while
    /// members with the present ones are live.
    pub(crate) fn changes_patterns(&self, patterns: &[Pattern]) -> Result<bool> {
        if patterns == self.config.patterns.as_slice() {
            return Ok(false);
        }
        if !self.members.is_empty() {
            return Err(StoreError::FailedPrecondition(format!(
                "group {:?} is consuming [{}] with {} live member(s); a member with other patterns must wait until they leave",
                self.config.name,
                self.config
                    .patterns
                    .iter()
                    .map(Pattern::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                self.members.len()
            )));
        }
        Ok(true)
    }

    /// A new member: its id, and the first sequence the group has not settled.
    pub(crate) fn join(
        &mut self,
        patterns: Vec<Pattern>,
        max_in_flight: u32,
        outlet: O,
        failure: Arc<OnceLock<String>>,
    ) -> Result<(u64, u64)> {
        if self.changes_patterns(&patterns)? {
            tracing::info!(group = %self.config.name, "group patterns changed");
            self.config.patterns = patterns;
            self.recount();
        }
        let id = self.next_member;
        self.next_member += 1;
        self.members.push(Member {
            id,
            outlet,
            failure,
            max_in_flight,
            in_flight: 0,
        });
        Ok((id, self.floor + 1))
    }

    /// Deliveries a member already holds, handed out by the group's previous
    /// owner (another node): in flight to it from now, with its attempts, their
    /// aggregates held, so that nothing of theirs goes out meanwhile. An event
    /// settled, parked, or in flight to another member, or whose aggregate another
    /// event holds, is not taken: the member's ack of it is then ignored.
    /// Returns the sequences taken.
    pub(crate) fn adopt(
        &mut self,
        member: u64,
        held: Vec<(Arc<StoredEvent>, u32)>,
        now: Instant,
    ) -> Vec<u64> {
        let mut taken = Vec::new();
        for (event, attempts) in held {
            let seq = event.sequence;
            let free = seq > self.floor
                && !self.settled.contains(&seq)
                && !self.in_flight.contains_key(&seq)
                && !self.parked.contains_key(&seq);
            let aggregate = event.event.aggregate_id.clone();
            let holder = self.busy.get(&aggregate).copied();
            if !free || (!aggregate.is_empty() && holder.is_some_and(|h| h != seq)) {
                continue;
            }
            let Some(m) = self.members.iter_mut().find(|m| m.id == member) else {
                return taken;
            };
            m.in_flight += 1;
            self.ready.remove(&seq);
            self.unloaded.remove(&seq);
            if !aggregate.is_empty() {
                self.busy.insert(aggregate, seq);
            }
            let deadline = after(now, self.config.ack_timeout);
            self.deadlines.insert((deadline, seq));
            self.in_flight.insert(
                seq,
                InFlight {
                    pending: Pending {
                        event,
                        attempts: attempts.max(1),
                    },
                    member,
                    deadline,
                },
            );
            taken.push(seq);
        }
        taken
    }

    /// What each member holds now: sequence and attempt of every delivery not
    /// settled, by member (for a handover to the group's next owner).
    pub(crate) fn held(&self) -> HashMap<u64, Vec<(u64, u32)>> {
        let mut held: HashMap<u64, Vec<(u64, u32)>> = HashMap::new();
        for (&seq, flight) in &self.in_flight {
            held.entry(flight.member)
                .or_default()
                .push((seq, flight.pending.attempts));
        }
        for list in held.values_mut() {
            list.sort_unstable();
        }
        held
    }

    /// Counts the lag again from the floor, at the next info.
    fn recount(&mut self) {
        self.scanned = self.floor;
        self.selected = 0;
    }

    /// The group as seen from outside, the log's head at `head`.
    pub(crate) fn info(&self, head: u64) -> GroupInfo {
        let unscanned = head.saturating_sub(self.scanned.max(self.floor));
        GroupInfo {
            name: self.config.name.clone(),
            patterns: self
                .config
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
            ack_timeout: self.config.ack_timeout,
            max_deliveries: self.config.max_deliveries,
            head_sequence: head,
            counts: self.tally.counts(),
            // Every delivery's deadline is its time out plus the same ack timeout.
            oldest_unacked: self
                .deadlines
                .first()
                .and_then(|(deadline, _)| deadline.checked_sub(self.config.ack_timeout))
                .map(|out| Instant::now().saturating_duration_since(out))
                .unwrap_or_default(),
        }
    }

    /// Everything up to `floor` settled, nothing above: in-flight deliveries are
    /// forgotten (their acks are ignored), parked events dropped.
    pub(crate) fn seek(&mut self, floor: u64) {
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
        self.changes.settled.clear();
        self.changes.parked.clear();
        self.changes.reset = true;
        self.changes.any = true;
        tracing::info!(group = %self.config.name, floor, "group seeked");
    }

    /// The log no longer holds anything up to `floor` (retention deleted it): the
    /// group moves its floor there. What it had not settled below is skipped:
    /// events read and not delivered, parked ones, and unread positions (their
    /// types are gone with them, so each counts). Deliveries out stay out until
    /// acked or timed out, from memory. Returns how many were skipped.
    pub(crate) fn trimmed(&mut self, floor: u64) -> u64 {
        if floor <= self.floor {
            return 0;
        }
        let unread = floor.saturating_sub(self.cursor.saturating_sub(1));
        let above = floor + 1;
        let kept_ready = self.ready.split_off(&above);
        let mut skipped = unread + self.ready.len() as u64;
        self.ready = kept_ready;
        let gone: Vec<u64> = self
            .parked
            .keys()
            .copied()
            .filter(|&s| s <= floor && !self.in_flight.contains_key(&s))
            .collect();
        skipped += gone.len() as u64;
        for seq in gone {
            self.parked.remove(&seq);
            if self.config.durable {
                self.changes.parked.push((seq, ParkedChange::Cleared));
            }
        }
        self.delayed.retain(|&(_, s)| s > floor);
        for waiting in self.blocked.values_mut() {
            waiting.retain(|&s| s > floor);
        }
        self.blocked.retain(|_, waiting| !waiting.is_empty());
        let freed: Vec<String> = self
            .busy
            .iter()
            .filter(|&(_, &s)| s <= floor && !self.in_flight.contains_key(&s))
            .map(|(aggregate, _)| aggregate.clone())
            .collect();
        for aggregate in freed {
            self.busy.remove(&aggregate);
            self.unblock(&aggregate);
        }
        for seq in self.redrive.iter().copied().filter(|&s| s <= floor) {
            self.changes.unredrive.push(seq);
        }
        self.redrive.retain(|&s| s > floor);
        self.unloaded.retain(|&s| s > floor);
        self.settled = self.settled.split_off(&above);
        self.floor = floor;
        while self.settled.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        self.cursor = self.cursor.max(self.floor + 1);
        self.recount();
        self.changes.any = true;
        skipped
    }

    /// Counts events retention deleted before the group settled them.
    pub(crate) fn count_skipped(&self, n: u64) {
        GroupTally::add(&self.tally.skipped, n);
    }

    /// Dead letters moved back to the group: delivered again at attempt 1.
    pub(crate) fn redriven(&mut self, sequences: &[u64]) {
        self.dead_count = self.dead_count.saturating_sub(sequences.len() as u64);
        for &seq in sequences {
            self.redrive.insert(seq);
            self.unloaded.insert(seq);
        }
    }

    /// Dead letters deleted.
    pub(crate) fn purged(&mut self, count: u64) {
        self.dead_count = self.dead_count.saturating_sub(count);
    }

    /// The changes since the last call, to persist (none for an ephemeral group).
    pub(crate) fn take_changes(&mut self) -> Option<Changes> {
        (self.config.durable && self.changes.any).then(|| std::mem::take(&mut self.changes))
    }

    /// Changes a checkpoint failed to persist: kept, ahead of those made since,
    /// for the next checkpoint (a backend applies each as a change to what it
    /// holds, so a lost one would be lost for good).
    pub(crate) fn keep_changes(&mut self, failed: Changes) {
        if self.changes.reset {
            // A seek since: it replaces everything before it.
            return;
        }
        let newer = std::mem::replace(&mut self.changes, failed);
        let merged = &mut self.changes;
        merged.any = true;
        merged.settled.extend(newer.settled);
        merged.unredrive.extend(newer.unredrive);
        merged.dead.extend(newer.dead);
        merged.parked.extend(newer.parked);
    }

    /// Forgets the changes not persisted: the group is deleted.
    pub(crate) fn discard_changes(&mut self) {
        self.changes = Changes::default();
    }
}

/// The core alone: no log, no task, no clock but the one each test moves.
#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use evmesh_proto::v1::Event;

    use super::*;

    /// A member's outlet that takes every delivery and keeps it.
    #[derive(Default)]
    struct Inbox {
        got: RefCell<Vec<(u64, u32)>>,
    }

    impl Outlet for Rc<Inbox> {
        fn offer(&self, delivery: Delivery) -> Result<(), Delivery> {
            self.got
                .borrow_mut()
                .push((delivery.event.sequence, delivery.attempt));
            Ok(())
        }
    }

    impl Inbox {
        /// Sequence and attempt of every delivery since the last call.
        fn take(&self) -> Vec<(u64, u32)> {
            std::mem::take(&mut *self.got.borrow_mut())
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn group(durable: bool, max_deliveries: u32) -> Core<Rc<Inbox>> {
        Core::new(
            GroupConfig {
                name: "g".into(),
                durable,
                patterns: vec![Pattern::parse("t.>").unwrap()],
                ack_timeout: TIMEOUT,
                max_deliveries,
            },
            0,
        )
    }

    fn event(sequence: u64, aggregate: &str) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            sequence,
            event: Event {
                r#type: "t.x".into(),
                aggregate_id: aggregate.into(),
                ..Default::default()
            },
        })
    }

    fn member(core: &mut Core<Rc<Inbox>>, max_in_flight: u32) -> (u64, Rc<Inbox>) {
        let inbox = Rc::new(Inbox::default());
        let (id, _) = core
            .join(
                core.config.patterns.clone(),
                max_in_flight,
                inbox.clone(),
                Arc::default(),
            )
            .unwrap();
        (id, inbox)
    }

    fn read(core: &mut Core<Rc<Inbox>>, events: &[(u64, &str)]) {
        for &(seq, aggregate) in events {
            core.read(event(seq, aggregate));
        }
    }

    fn ack(core: &mut Core<Rc<Inbox>>, sequences: &[u64], now: Instant) {
        core.feedback(Feedback::Ack(sequences.to_vec()), now);
        core.dispatch(now);
    }

    fn nack(core: &mut Core<Rc<Inbox>>, seq: u64, delay: Duration, now: Instant) {
        core.feedback(
            Feedback::Nack {
                sequences: vec![seq],
                delay,
                reason: "no".into(),
            },
            now,
        );
        core.dispatch(now);
    }

    #[test]
    fn one_event_per_aggregate_at_a_time_in_log_order() {
        let now = Instant::now();
        let mut core = group(false, 0);
        let (_, inbox) = member(&mut core, 10);
        read(&mut core, &[(1, "a"), (2, "a"), (3, "b"), (4, ""), (5, "")]);
        core.dispatch(now);
        assert_eq!(inbox.take(), [(1, 1), (3, 1), (4, 1), (5, 1)]);
        ack(&mut core, &[3, 4, 5], now);
        assert_eq!(inbox.take(), []);
        ack(&mut core, &[1], now);
        assert_eq!(inbox.take(), [(2, 1)]);
        ack(&mut core, &[2], now);
        assert_eq!(core.floor(), 5);
    }

    #[test]
    fn deliveries_held_from_a_previous_owner_hold_their_aggregates() {
        let now = Instant::now();
        let mut core = group(true, 3);
        let (b, from_b) = member(&mut core, 10);
        let (c, from_c) = member(&mut core, 10);
        // b holds 2 (aggregate a, its second attempt), c holds 3 (aggregate x).
        let taken = core.adopt(b, vec![(event(2, "a"), 2)], now);
        assert_eq!(taken, [2]);
        assert_eq!(core.adopt(c, vec![(event(3, "x"), 1)], now), [3]);
        // Another member's claim on a held event, or one that another event of its
        // aggregate holds, is not taken.
        assert_eq!(
            core.adopt(c, vec![(event(2, "a"), 1)], now),
            Vec::<u64>::new()
        );
        assert_eq!(
            core.adopt(c, vec![(event(1, "a"), 1)], now),
            Vec::<u64>::new()
        );
        read(
            &mut core,
            &[(1, "q"), (2, "a"), (3, "x"), (4, "a"), (5, "x"), (6, "")],
        );
        core.dispatch(now);
        let mut out = from_b.take();
        out.extend(from_c.take());
        out.sort_unstable();
        // 2 and 3 are out already; 4 and 5 wait for them.
        assert_eq!(out, [(1, 1), (6, 1)]);
        assert_eq!(core.held().get(&b).map(Vec::len), Some(2));
        // A nack of an adopted event counts on from its attempts.
        nack(&mut core, 2, Duration::ZERO, now);
        let mut out = from_b.take();
        out.extend(from_c.take());
        assert_eq!(out, [(2, 3)]);
        ack(&mut core, &[3], now);
        let mut out = from_b.take();
        out.extend(from_c.take());
        assert_eq!(out, [(5, 1)]);
    }

    #[test]
    fn the_group_counts_what_it_does() {
        let now = Instant::now();
        let mut core = group(true, 2);
        let (_, inbox) = member(&mut core, 10);
        read(&mut core, &[(1, "a"), (2, "b")]);
        core.dispatch(now);
        assert_eq!(inbox.take(), [(1, 1), (2, 1)]);
        ack(&mut core, &[1], now);
        nack(&mut core, 2, Duration::ZERO, now);
        assert_eq!(inbox.take(), [(2, 2)]);
        // The second nack uses up its deliveries: a dead letter.
        nack(&mut core, 2, Duration::ZERO, now);
        let counts = core.info(2).counts;
        assert_eq!(
            counts,
            crate::GroupCounts {
                delivered: 3,
                redelivered: 1,
                acked: 1,
                nacked: 2,
                dead_lettered: 1,
                skipped: 0,
            }
        );
        assert_eq!(core.info(2).oldest_unacked, Duration::ZERO);
    }

    #[test]
    fn a_trimmed_log_moves_the_floor_and_skips_what_was_not_settled() {
        let now = Instant::now();
        let mut core = group(true, 0);
        let (_, inbox) = member(&mut core, 1);
        // 1 is delivered, 2 waits for it (credit 1), 3 is parked after a nack.
        read(&mut core, &[(1, "a"), (2, "b"), (3, "c")]);
        core.dispatch(now);
        assert_eq!(inbox.take(), [(1, 1)]);
        ack(&mut core, &[1], now);
        assert_eq!(inbox.take(), [(2, 1)]);
        ack(&mut core, &[2], now);
        assert_eq!(inbox.take(), [(3, 1)]);
        nack(&mut core, 3, Duration::from_secs(60), now);
        read(&mut core, &[(4, "d")]);
        core.dispatch(now);
        assert_eq!(inbox.take(), [(4, 1)]);
        // The log lost everything up to 6: 3 (parked) and 5, 6 (never read) are
        // skipped; 4 is out and stays out until acked.
        assert_eq!(core.trimmed(6), 3);
        assert_eq!(core.floor(), 6);
        assert_eq!(core.cursor(), 7);
        assert_eq!(core.trimmed(5), 0, "a floor never moves back");
        ack(&mut core, &[4], now);
        read(&mut core, &[(7, "c")]);
        core.dispatch(now);
        // Aggregate c is no longer held by the parked 3.
        assert_eq!(inbox.take(), [(7, 1)]);
        ack(&mut core, &[7], now);
        assert_eq!(core.floor(), 7);
        assert_eq!(core.info(7).lag, 0);
        assert!(core.take_changes().is_some_and(|c| {
            c.parked
                .iter()
                .any(|(seq, change)| *seq == 3 && matches!(change, ParkedChange::Cleared))
        }));
    }

    #[test]
    fn a_member_gets_at_most_its_credit() {
        let now = Instant::now();
        let mut core = group(false, 0);
        let (_, first) = member(&mut core, 2);
        let (_, second) = member(&mut core, 1);
        read(&mut core, &[(1, ""), (2, ""), (3, ""), (4, ""), (5, "")]);
        core.dispatch(now);
        let (a, b) = (first.take(), second.take());
        assert_eq!((a.len(), b.len()), (2, 1), "{a:?} {b:?}");
        ack(&mut core, &[b[0].0], now);
        assert_eq!(second.take().len(), 1);
        assert_eq!(first.take(), []);
    }

    #[test]
    fn an_unacked_delivery_comes_again_after_the_timeout_then_dead_letters() {
        let now = Instant::now();
        let mut core = group(true, 2);
        let (_, inbox) = member(&mut core, 10);
        read(&mut core, &[(1, "a"), (2, "a")]);
        core.dispatch(now);
        assert_eq!(inbox.take(), [(1, 1)]);
        assert_eq!(core.next_wake(), Some(now + TIMEOUT));
        core.expire(now + TIMEOUT - Duration::from_millis(1));
        core.dispatch(now);
        assert_eq!(inbox.take(), []);
        let later = now + TIMEOUT;
        core.expire(later);
        core.dispatch(later);
        assert_eq!(inbox.take(), [(1, 2)]);
        let last = later + TIMEOUT;
        core.expire(last);
        core.dispatch(last);
        // Two deliveries used: a dead letter, and the aggregate's next goes out.
        assert_eq!(inbox.take(), [(2, 1)]);
        let changes = core.take_changes().expect("changes");
        assert_eq!(changes.dead.len(), 1);
        assert_eq!((changes.dead[0].sequence, changes.dead[0].attempts), (1, 2));
        assert!(changes.dead[0].reason.contains("no ack within"));
        assert_eq!(core.info(2).dead_letters, 1);
    }

    #[test]
    fn a_delayed_nack_holds_only_its_aggregate_and_comes_back_first() {
        let now = Instant::now();
        let delay = Duration::from_secs(60);
        let mut core = group(true, 0);
        let (_, inbox) = member(&mut core, 10);
        read(&mut core, &[(1, "a"), (2, "a"), (3, "b")]);
        core.dispatch(now);
        assert_eq!(inbox.take(), [(1, 1), (3, 1)]);
        nack(&mut core, 1, delay, now);
        ack(&mut core, &[3], now);
        // 1 is parked and 2 waits behind it: both settled for the floor.
        assert_eq!(inbox.take(), []);
        assert_eq!(core.floor(), 3);
        assert_eq!(core.info(3).lag, 2);
        assert_eq!(core.next_wake(), Some(now + delay));
        let due = now + delay;
        core.expire(due);
        assert_eq!(core.next_to_load(), Some(1));
        core.loaded(1, Some(event(1, "a")));
        core.dispatch(due);
        assert_eq!(inbox.take(), [(1, 2)]);
        ack(&mut core, &[1], due);
        assert_eq!(core.next_to_load(), Some(2));
        core.loaded(2, Some(event(2, "a")));
        core.dispatch(due);
        assert_eq!(inbox.take(), [(2, 1)]);
        ack(&mut core, &[2], due);
        assert_eq!(core.info(3).lag, 0);
        let parked: Vec<(u64, bool)> = core
            .take_changes()
            .expect("changes")
            .parked
            .into_iter()
            .map(|(seq, change)| (seq, change == ParkedChange::Cleared))
            .collect();
        // Set aside, then cleared as each is acked.
        assert_eq!(parked, [(1, false), (2, false), (1, true), (2, true)]);
    }

    #[test]
    fn a_leaving_member_hands_back_what_it_held() {
        let now = Instant::now();
        let mut core = group(false, 0);
        let (first_id, first) = member(&mut core, 1);
        read(&mut core, &[(1, "a")]);
        core.dispatch(now);
        assert_eq!(first.take(), [(1, 1)]);
        let (_, second) = member(&mut core, 1);
        core.leave(first_id, now);
        core.dispatch(now);
        assert_eq!(second.take(), [(1, 2)]);
        assert_eq!(core.member_count(), 1);
    }

    #[test]
    fn a_seek_forgets_what_was_in_flight() {
        let now = Instant::now();
        let mut core = group(true, 0);
        let (_, inbox) = member(&mut core, 10);
        read(&mut core, &[(1, "a"), (2, "a"), (3, "")]);
        core.dispatch(now);
        assert_eq!(inbox.take(), [(1, 1), (3, 1)]);
        core.seek(0);
        assert_eq!(core.cursor(), 1);
        // An ack from before the seek is ignored; the log is read again.
        ack(&mut core, &[1], now);
        assert_eq!(core.floor(), 0);
        read(&mut core, &[(1, "a"), (2, "a"), (3, "")]);
        core.dispatch(now);
        assert_eq!(inbox.take(), [(1, 1), (3, 1)]);
        assert!(core.take_changes().expect("changes").reset);
    }

    #[test]
    fn other_patterns_wait_until_the_members_leave() {
        let mut core = group(false, 0);
        let (id, _) = member(&mut core, 1);
        let other = vec![Pattern::parse("u.>").unwrap()];
        assert!(core.changes_patterns(&other).is_err());
        core.leave(id, Instant::now());
        assert!(core.changes_patterns(&other).unwrap());
        let inbox = Rc::new(Inbox::default());
        core.join(other, 1, inbox, Arc::default()).unwrap();
        assert_eq!(core.info(0).patterns, ["u.>"]);
    }
}
