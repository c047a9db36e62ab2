//! Durable groups across the nodes of a mesh. One node at a time owns a group: it
//! holds the group's lease (a key in the `EVMESH_OWNERS` bucket, whose entries
//! lapse [`LEASE_TTL`] after their last write) and runs the group's dispatcher, the
//! same task and core as on one node. Every node with members of the group has an
//! [`Agent`] for it, which holds its members' subscriptions whatever the owner: it
//! joins them to the dispatcher when its node owns the group, or relays them to the
//! owner over core NATS (`evmesh.relay.<instance>.<kind>`): a join with what the
//! member holds, deliveries to the member's node, acks and nacks back, heartbeats.
//!
//! When the owner dies or is cut off, its lease lapses and a node with members
//! takes it; each agent joins its members to the new owner with the deliveries
//! they hold (sequence and attempt), which the new owner takes as in flight before
//! it dispatches anything: it waits [`TAKEOVER_GRACE`] for them when other nodes
//! announced members of the group. An owner that cannot renew its lease stops
//! dispatching [`LEASE_MARGIN`] before the lease could lapse, and hands what its
//! members hold to their agents; the group record's compare-and-set refuses a
//! checkpoint from a node that lost the group.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use evmesh_proto::v1::Event;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{JetStreamGroups, JetStreamLog, unavailable};
use crate::dispatch::{Command, GroupHandle, GroupRegistry, Tenure};
use crate::{
    Delivery, Feedback, GroupInfo, Membership, NodeGroup, Pattern, Result, StoreError, StoredEvent,
    Subscription, SubscriptionControl, SubscriptionSpec,
};

/// The bucket of group leases: a key per owned group, its value the owner's
/// instance.
pub const OWNERS_BUCKET: &str = "EVMESH_OWNERS";
/// How long a lease stands after its last renewal.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often an owner renews its leases.
const RENEW_EVERY: Duration = Duration::from_millis(750);
/// An owner stops this long before its lease could lapse, counted from when it
/// sent its last renewal that was answered.
const LEASE_MARGIN: Duration = Duration::from_secs(1);
/// How often an agent looks after its group (lease, links, heartbeats).
const TICK: Duration = Duration::from_millis(250);
/// How often a member's node tells the owner its members are alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A remote member not heard of for this long has left.
const REMOTE_SILENCE: Duration = Duration::from_secs(5);
/// How long a new owner waits at most for the nodes with members of the group to
/// say what they hold before it dispatches: until a node that cannot say has
/// stopped announcing itself.
const TAKEOVER_WAIT: Duration = crate::NODE_TTL;
/// How often a new owner that waits reads the nodes' announcements again.
const TAKEOVER_RECHECK: Duration = Duration::from_secs(1);
/// How long taking a lease keeps trying through errors that a leader election
/// causes, and how often.
const TRANSIENT_PATIENCE: Duration = Duration::from_secs(5);
const TRANSIENT_STEP: Duration = Duration::from_millis(250);
/// A node whose last announcement is older than this (it announces every 2 s) is
/// taken for gone: a new owner does not wait for it. A node alive but cut off from
/// NATS stops announcing too; its members count as gone (README).
const ANNOUNCEMENT_STALE: Duration = Duration::from_secs(4);
/// Stands for nodes not known yet (the announcements could not be read).
const UNKNOWN: &str = "?";
/// How long a request to another node waits for its answer.
const RELAY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an admin call keeps looking for the group's owner.
const ADMIN_PATIENCE: Duration = Duration::from_secs(10);

const GROUP_HEADER: &str = "Evmesh-Group";
const MEMBER_HEADER: &str = "Evmesh-Member";
const OWNER_HEADER: &str = "Evmesh-Owner";
const SEQUENCE_HEADER: &str = "Evmesh-Sequence";
const ATTEMPT_HEADER: &str = "Evmesh-Attempt";

/// A subject of a node's relay inbox.
fn relay(instance: &str, kind: &str) -> String {
    format!("evmesh.relay.{instance}.{kind}")
}

/// A member's node asks the owner to take a member.
#[derive(Serialize, Deserialize)]
struct JoinRequest {
    /// The member's node (its instance).
    from: String,
    /// The member's id on its node.
    member: u64,
    patterns: Vec<String>,
    max_in_flight: u32,
    /// Deliveries it holds from an earlier owner: sequence and attempt.
    held: Vec<(u64, u32)>,
}

#[derive(Serialize, Deserialize)]
struct Joined {
    /// The member's id at the owner.
    member: u64,
    start_sequence: u64,
    created: bool,
}

#[derive(Serialize, Deserialize)]
struct FeedbackMessage {
    /// The member's id at the owner.
    member: u64,
    acks: Vec<u64>,
    nacks: Vec<u64>,
    delay_ms: u64,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    from: String,
    /// Members' ids at the owner.
    members: Vec<u64>,
}

/// A call on a group that its owner answers.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) enum AdminOp {
    Info,
    Seek(u64),
    Flush,
    Redrive(Vec<u64>),
    Purge(Vec<u64>),
    Delete,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum AdminAnswer {
    Info(GroupInfo),
    Count(u64),
    Done,
}

/// A store error as the relay carries it.
#[derive(Serialize, Deserialize)]
struct Failure {
    kind: String,
    message: String,
}

/// What the owner a request went to answered: `NotOwner` sends the caller to look
/// for the owner again.
const NOT_OWNER: &str = "not_owner";

impl Failure {
    fn of(e: &StoreError) -> Self {
        let (kind, message) = match e {
            StoreError::AlreadyExists(m) => ("already_exists", m.clone()),
            StoreError::NotFound(m) => ("not_found", m.clone()),
            StoreError::InvalidArgument(m) => ("invalid_argument", m.clone()),
            StoreError::FailedPrecondition(m) => ("failed_precondition", m.clone()),
            StoreError::Unavailable(m) => ("unavailable", m.clone()),
            StoreError::ShuttingDown => ("unavailable", "the group's owner is stopping".into()),
            other => ("backend", other.to_string()),
        };
        Self {
            kind: kind.into(),
            message,
        }
    }

    fn not_owner() -> Self {
        Self {
            kind: NOT_OWNER.into(),
            message: String::new(),
        }
    }

    fn into_error(self) -> StoreError {
        match self.kind.as_str() {
            "already_exists" => StoreError::AlreadyExists(self.message),
            "not_found" => StoreError::NotFound(self.message),
            "invalid_argument" => StoreError::InvalidArgument(self.message),
            "failed_precondition" => StoreError::FailedPrecondition(self.message),
            "unavailable" | NOT_OWNER => StoreError::Unavailable(self.message),
            _ => StoreError::Backend(self.message.into()),
        }
    }
}

type Answer<T> = std::result::Result<T, Failure>;

fn encode<T: Serialize>(value: &T) -> Bytes {
    // Plain data: serialising it cannot fail.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(payload)
        .map_err(|e| StoreError::Backend(format!("a relayed {what} does not decode: {e}").into()))
}

fn header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

fn header_u64(message: &async_nats::Message, name: &str) -> Option<u64> {
    header(message, name).and_then(|v| v.parse().ok())
}

/// What reaches a group's agent.
enum Call {
    Subscribe(SubscriptionSpec, oneshot::Sender<Result<Subscription>>),
    Admin(AdminOp, oneshot::Sender<Result<AdminAnswer>>),
    /// A message of the relay for this group, by its kind.
    Relay(String, async_nats::Message),
}

/// The node's side of the mesh: its agents, its relay inbox, its leases.
#[derive(Clone)]
pub(crate) struct Mesh {
    shared: Arc<Shared>,
}

struct Shared {
    client: async_nats::Client,
    leases: kv::Store,
    /// This node's instance: unique to this run of it.
    instance: String,
    log: JetStreamLog,
    registry: GroupRegistry<JetStreamGroups>,
    shutdown: watch::Receiver<bool>,
    agents: tokio::sync::Mutex<HashMap<String, mpsc::Sender<Call>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// What each agent last said of its group, for the node's announcements.
    view: Mutex<BTreeMap<String, NodeGroup>>,
    /// The name this node announces itself by, once it has.
    name: Mutex<Option<String>>,
    _inbox: super::AbortOnDrop,
}

/// A name for this run of the node: the time and the process, in base 36.
fn new_instance() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut n = nanos ^ (u128::from(std::process::id()) << 64);
    let mut out = String::new();
    while n > 0 {
        let digit = (n % 36) as u32;
        out.push(char::from_digit(digit, 36).unwrap_or('0'));
        n /= 36;
    }
    out
}

impl Mesh {
    pub(crate) async fn open(
        log: JetStreamLog,
        registry: GroupRegistry<JetStreamGroups>,
        shutdown: watch::Receiver<bool>,
        replicas: usize,
    ) -> Result<Self> {
        let js = log.context();
        let leases = leases_bucket(&js, replicas).await?;
        let client = log.client();
        let instance = new_instance();
        let inbox = client
            .subscribe(relay(&instance, ">"))
            .await
            .map_err(|e| unavailable("opening the node's relay inbox", e))?;
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            let weak = weak.clone();
            Shared {
                client,
                leases,
                instance,
                log,
                registry,
                shutdown,
                agents: tokio::sync::Mutex::default(),
                tasks: Mutex::default(),
                view: Mutex::default(),
                name: Mutex::default(),
                _inbox: super::AbortOnDrop(tokio::spawn(route(weak, inbox))),
            }
        });
        Ok(Self { shared })
    }

    /// Joins a member to a durable group, through whichever node owns it.
    pub(crate) async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription> {
        let group = spec.group.clone().unwrap_or_default();
        let (reply, answer) = oneshot::channel();
        self.call(&group, Call::Subscribe(spec, reply)).await?;
        answer.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// A call on a group, answered by its owner.
    pub(crate) async fn admin(&self, group: &str, op: AdminOp) -> Result<AdminAnswer> {
        let (reply, answer) = oneshot::channel();
        self.call(group, Call::Admin(op, reply)).await?;
        answer.await.map_err(|_| StoreError::ShuttingDown)?
    }

    pub(crate) async fn info(&self, group: &str) -> Result<GroupInfo> {
        match self.admin(group, AdminOp::Info).await? {
            AdminAnswer::Info(info) => Ok(info),
            _ => Err(StoreError::Backend(
                "the owner answered info with something else".into(),
            )),
        }
    }

    pub(crate) async fn count(&self, group: &str, op: AdminOp) -> Result<u64> {
        match self.admin(group, op).await? {
            AdminAnswer::Count(n) => Ok(n),
            _ => Err(StoreError::Backend(
                "the owner answered with something else".into(),
            )),
        }
    }

    async fn call(&self, group: &str, call: Call) -> Result<()> {
        let mut call = call;
        for _ in 0..3 {
            let agent = self.shared.agent(group).await?;
            match agent.send(call).await {
                Ok(()) => return Ok(()),
                // The agent retired as it was asked: a fresh one takes it.
                Err(mpsc::error::SendError(back)) => call = back,
            }
        }
        Err(StoreError::Unavailable(format!(
            "group {group:?} keeps stopping as it is called"
        )))
    }

    /// The groups this node owns or has members of.
    pub(crate) fn local_groups(&self) -> Vec<NodeGroup> {
        lock(&self.shared.view).values().cloned().collect()
    }

    /// The instance holding `group`'s lease now, if any.
    pub(crate) async fn owner(&self, group: &str) -> Result<Option<String>> {
        let entry = self
            .shared
            .leases
            .entry(group)
            .await
            .map_err(|e| unavailable("reading a group's lease", e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    /// This run of the node: its relay inbox.
    pub(crate) fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// Remembers the name this node announces itself by.
    pub(crate) fn named(&self, name: &str) {
        *lock(&self.shared.name) = Some(name.to_owned());
    }

    /// Waits for every agent to end (the store has signalled its shutdown), each
    /// releasing the leases it holds once its dispatcher has stopped.
    pub(crate) async fn stop(&self) {
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for task in tasks {
            let _ = task.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn leases_bucket(js: &jetstream::Context, replicas: usize) -> Result<kv::Store> {
    super::lapsing_bucket(js, OWNERS_BUCKET, LEASE_TTL, replicas).await
}

impl Shared {
    /// The agent of a group, started when it has none.
    async fn agent(self: &Arc<Self>, group: &str) -> Result<mpsc::Sender<Call>> {
        let mut agents = self.agents.lock().await;
        if let Some(agent) = agents.get(group)
            && !agent.is_closed()
        {
            return Ok(agent.clone());
        }
        if *self.shutdown.borrow() {
            return Err(StoreError::ShuttingDown);
        }
        let (tx, rx) = mpsc::channel(4096);
        let (feedback_tx, feedback) = mpsc::channel(4096);
        let (leave_tx, leave) = mpsc::unbounded_channel();
        let agent = Agent {
            group: group.to_owned(),
            shared: self.clone(),
            own: tx.clone(),
            calls: rx,
            feedback_tx,
            feedback,
            leave_tx,
            leave,
            members: BTreeMap::new(),
            next_member: 1,
            role: Role::Idle,
            heartbeat_at: Instant::now(),
            created: false,
            shown: None,
        };
        let task = tokio::spawn(agent.run());
        {
            let mut tasks = lock(&self.tasks);
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
        agents.insert(group.to_owned(), tx.clone());
        Ok(tx)
    }

    /// The other nodes (their instances) that announce members of `group` and
    /// announced lately: they may hold deliveries of it. The owner whose lease
    /// lapsed counts too while it still announces: alive, its members hold what it
    /// handed them.
    async fn member_nodes(&self, group: &str) -> HashSet<String> {
        let name = lock(&self.name).clone();
        match self.log.nodes().await {
            Ok(nodes) => nodes
                .into_iter()
                .filter(|n| {
                    Some(&n.name) != name.as_ref()
                        && !n.instance.is_empty()
                        && n.instance != self.instance
                        // One from a clock ahead of this node's counts as fresh.
                        && n.seen_at
                            .elapsed()
                            .map_or(true, |age| age < ANNOUNCEMENT_STALE)
                        && n.groups.iter().any(|g| g.name == group && g.members > 0)
                })
                .map(|n| n.instance)
                .collect(),
            Err(e) => {
                tracing::debug!(group, error = %e, "reading the nodes' announcements");
                HashSet::from([UNKNOWN.to_owned()])
            }
        }
    }

    async fn request<T: for<'de> Deserialize<'de>>(
        &self,
        subject: String,
        group: &str,
        payload: Bytes,
        what: &str,
    ) -> std::result::Result<T, RelayError> {
        let mut headers = HeaderMap::new();
        headers.insert(GROUP_HEADER, group);
        let request = async_nats::Request::new()
            .payload(payload)
            .headers(headers)
            .timeout(Some(RELAY_TIMEOUT));
        let reply = self
            .client
            .send_request(subject, request)
            .await
            .map_err(|e| RelayError::Lost(e.to_string()))?;
        let answer: Answer<T> =
            decode(&reply.payload, what).map_err(|e| RelayError::Lost(e.to_string()))?;
        answer.map_err(|f| {
            if f.kind == NOT_OWNER {
                RelayError::NotOwner
            } else {
                RelayError::Refused(f.into_error())
            }
        })
    }

    async fn publish(&self, subject: String, headers: HeaderMap, payload: Bytes) {
        if let Err(e) = self
            .client
            .publish_with_headers(subject, headers, payload)
            .await
        {
            tracing::debug!(error = %e, "relaying");
        }
    }

    async fn answer<T: Serialize>(&self, message: &async_nats::Message, answer: &Answer<T>) {
        if let Some(reply) = &message.reply
            && let Err(e) = self.client.publish(reply.clone(), encode(answer)).await
        {
            tracing::debug!(error = %e, "answering a relayed request");
        }
    }
}

/// Why a request to another node did not get its answer.
enum RelayError {
    /// It does not own the group (any more).
    NotOwner,
    /// No answer: the node is gone, or slow.
    Lost(String),
    /// It answered with an error.
    Refused(StoreError),
}

/// Hands each message of the node's relay inbox to its group's agent; a request
/// for a group this node has no agent of is answered "not the owner".
async fn route(shared: std::sync::Weak<Shared>, mut inbox: async_nats::Subscriber) {
    use futures_util::StreamExt as _;
    while let Some(message) = inbox.next().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let kind = message
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let Some(group) = header(&message, GROUP_HEADER).map(str::to_owned) else {
            continue;
        };
        let agent = shared.agents.lock().await.get(&group).cloned();
        let refused = match agent {
            Some(agent) => agent
                .send(Call::Relay(kind, message))
                .await
                .err()
                .map(|mpsc::error::SendError(call)| call),
            None => Some(Call::Relay(kind, message)),
        };
        if let Some(Call::Relay(_, message)) = refused {
            shared
                .answer::<()>(&message, &Err(Failure::not_owner()))
                .await;
        }
    }
}

/// A member on this node.
struct Local {
    patterns: Vec<Pattern>,
    max_in_flight: u32,
    tx: mpsc::Sender<Delivery>,
    failure: Arc<OnceLock<String>>,
    link: Link,
    /// What it holds that the owner handed out, as far as this node knows
    /// (tracked while the owner is another node, or after a handover).
    held: BTreeMap<u64, u32>,
    /// Feedback it sent while it had no owner to send it to.
    unsent: Vec<Feedback>,
}

/// How a member on this node reaches the group's owner.
enum Link {
    /// Not joined to the present owner yet.
    None,
    /// Joined to this node's dispatcher.
    Local(SubscriptionControl),
    /// Joined to another node's, under this id there.
    Remote(u64),
}

/// A member of another node, joined to this node's dispatcher.
struct Remote {
    from: String,
    member: u64,
    control: SubscriptionControl,
    heard: Instant,
    _forward: super::AbortOnDrop,
}

struct Owner {
    revision: u64,
    /// Until when this node may dispatch: its last answered renewal plus the
    /// lease less the margin. The dispatcher reads it too.
    valid_until: watch::Sender<Instant>,
    renew_at: Instant,
    handle: GroupHandle,
    /// Remote members by their id here.
    remote: HashMap<u64, Remote>,
    /// The dispatcher holds back until the nodes that may hold deliveries from
    /// the last owner (`waiting`) and this node's members have joined.
    held_back: bool,
    waiting: HashSet<String>,
    checked: Instant,
}

enum Role {
    /// Neither owns the group nor knows its owner.
    Idle,
    Owner(Owner),
    /// Another node owns it: its instance.
    Follower(String),
}

/// One group on one node: its members here, and its ownership.
struct Agent {
    group: String,
    shared: Arc<Shared>,
    own: mpsc::Sender<Call>,
    calls: mpsc::Receiver<Call>,
    feedback_tx: mpsc::Sender<(u64, Feedback)>,
    feedback: mpsc::Receiver<(u64, Feedback)>,
    leave_tx: mpsc::UnboundedSender<u64>,
    leave: mpsc::UnboundedReceiver<u64>,
    members: BTreeMap<u64, Local>,
    next_member: u64,
    role: Role,
    heartbeat_at: Instant,
    /// The last take of the lease created the group.
    created: bool,
    /// What `view` last said of the group.
    shown: Option<(u32, bool)>,
}

impl Agent {
    async fn run(mut self) {
        let mut shutdown = self.shared.shutdown.clone();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.publish_view();
            if *shutdown.borrow_and_update() {
                break;
            }
            // The lease and the heartbeats first: a busy group must not starve them.
            tokio::select! {
                biased;
                _ = shutdown.changed() => {}
                _ = tick.tick() => {
                    self.look_after().await;
                    if self.retire().await {
                        return;
                    }
                }
                Some(member) = self.leave.recv() => self.on_leave(member).await,
                Some((member, feedback)) = self.feedback.recv() => {
                    self.on_feedback(member, feedback).await;
                }
                call = self.calls.recv() => match call {
                    Some(call) => self.on_call(call).await,
                    None => break,
                },
            }
        }
        self.stop().await;
    }

    fn publish_view(&mut self) {
        let owner = matches!(self.role, Role::Owner(_));
        let members = u32::try_from(self.members.len()).unwrap_or(u32::MAX);
        if self.shown == Some((members, owner)) {
            return;
        }
        self.shown = Some((members, owner));
        let mut view = lock(&self.shared.view);
        if members == 0 && !owner {
            view.remove(&self.group);
        } else {
            view.insert(
                self.group.clone(),
                NodeGroup {
                    name: self.group.clone(),
                    members,
                    owner,
                },
            );
        }
    }

    /// Leaves the node's agents when it has nothing to do, unless a call waits.
    async fn retire(&mut self) -> bool {
        if !self.members.is_empty() || !matches!(self.role, Role::Idle) {
            return false;
        }
        let mut agents = self.shared.agents.lock().await;
        if !self.calls.is_empty() {
            return false;
        }
        if agents
            .get(&self.group)
            .is_some_and(|a| a.same_channel(&self.own))
        {
            agents.remove(&self.group);
        }
        self.calls.close();
        drop(agents);
        lock(&self.shared.view).remove(&self.group);
        true
    }

    /// The node is stopping: the dispatcher checkpoints and stops (the registry
    /// awaits it), then the lease goes, so that another node takes the group at
    /// once rather than when the lease lapses.
    async fn stop(&mut self) {
        if let Role::Owner(owner) = &self.role {
            let until = Instant::now() + Duration::from_secs(10);
            while !owner.handle.is_closed() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.release().await;
        }
        lock(&self.shared.view).remove(&self.group);
    }

    async fn release(&mut self) {
        if let Role::Owner(owner) = std::mem::replace(&mut self.role, Role::Idle)
            && let Err(e) = self
                .shared
                .leases
                .delete_expect_revision(&self.group, Some(owner.revision))
                .await
        {
            tracing::debug!(group = %self.group, error = %e, "releasing a group's lease");
        }
    }

    async fn on_call(&mut self, call: Call) {
        match call {
            Call::Subscribe(spec, reply) => {
                let _ = reply.send(self.subscribe(spec).await);
            }
            Call::Admin(op, reply) => {
                let _ = reply.send(self.admin(op).await);
            }
            Call::Relay(kind, message) => self.on_relay(&kind, message).await,
        }
    }

    async fn subscribe(&mut self, spec: SubscriptionSpec) -> Result<Subscription> {
        let max_in_flight = spec
            .max_in_flight
            .clamp(1, SubscriptionSpec::MAX_MAX_IN_FLIGHT);
        let (tx, deliveries) = mpsc::channel(max_in_flight as usize);
        let id = self.next_member;
        self.next_member += 1;
        let failure = Arc::new(OnceLock::new());
        self.members.insert(
            id,
            Local {
                patterns: spec.patterns.clone(),
                max_in_flight,
                tx,
                failure: failure.clone(),
                link: Link::None,
                held: BTreeMap::new(),
                unsent: Vec::new(),
            },
        );
        let mut last = None;
        let mut found = None;
        for _ in 0..5 {
            match self.link(id, Some(&spec)).await {
                Ok(joined) => {
                    found = Some(joined);
                    break;
                }
                Err(LinkError::Retry(e)) => {
                    last = Some(e);
                    tokio::time::sleep(TICK).await;
                }
                Err(LinkError::Refused(e)) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let Some((start_sequence, created)) = found else {
            self.members.remove(&id);
            return Err(last.unwrap_or_else(|| {
                StoreError::Unavailable(format!("no node could take group {:?}", self.group))
            }));
        };
        self.maybe_release().await;
        Ok(Subscription {
            group: self.group.clone(),
            member_id: format!("{}.{id}", self.shared.instance),
            created,
            start_sequence,
            auto_ack: spec.auto_ack,
            deliveries,
            failure,
            control: SubscriptionControl {
                member: id,
                feedback: self.feedback_tx.clone(),
                _membership: Membership::new(id, self.leave_tx.clone()),
            },
        })
    }

    /// Finds the group's owner when none is known: takes the lease when it is
    /// free, else follows its holder. `create` makes the group when this node
    /// takes it and it does not exist.
    async fn resolve(&mut self, create: Option<&SubscriptionSpec>) -> Result<()> {
        if !matches!(self.role, Role::Idle) {
            return Ok(());
        }
        let value = Bytes::from(self.shared.instance.clone());
        for _ in 0..3 {
            let mut sent = Instant::now();
            // Right after a NATS server restarts, the bucket's stream can be
            // missing for a moment while its replicas elect a leader.
            let mut waited = Duration::ZERO;
            let created = loop {
                match self.shared.leases.create(&self.group, value.clone()).await {
                    Err(e)
                        if e.kind() != kv::CreateErrorKind::AlreadyExists
                            && waited < TRANSIENT_PATIENCE =>
                    {
                        tracing::debug!(group = %self.group, error = %e, "taking a group's lease; trying again");
                        tokio::time::sleep(TRANSIENT_STEP).await;
                        waited += TRANSIENT_STEP;
                        sent = Instant::now();
                    }
                    created => break created,
                }
            };
            match created {
                Ok(revision) => return self.take(revision, sent, create).await,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(unavailable("taking a group's lease", e)),
            }
            let entry = self
                .shared
                .leases
                .entry(&self.group)
                .await
                .map_err(|e| unavailable("reading a group's lease", e))?;
            match entry {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    let holder = String::from_utf8_lossy(&entry.value).into_owned();
                    if holder == self.shared.instance {
                        // Ours from before (a renewal answered late): start over.
                        let _ = self
                            .shared
                            .leases
                            .delete_expect_revision(&self.group, Some(entry.revision))
                            .await;
                        continue;
                    }
                    self.role = Role::Follower(holder);
                    self.heartbeat_at = Instant::now() + HEARTBEAT_EVERY;
                    return Ok(());
                }
                // Lapsed or released meanwhile: try again.
                _ => {}
            }
        }
        Err(StoreError::Unavailable(format!(
            "group {:?} changes owner as it is asked; try again",
            self.group
        )))
    }

    /// This node holds the group's lease: starts its dispatcher.
    async fn take(
        &mut self,
        revision: u64,
        sent: Instant,
        create: Option<&SubscriptionSpec>,
    ) -> Result<()> {
        // Nothing goes out until every member that may hold deliveries from the
        // last owner has said what (maybe_release).
        let waiting = self.shared.member_nodes(&self.group).await;
        let (valid_until, lease) = watch::channel(sent + LEASE_TTL - LEASE_MARGIN);
        let tenure = Tenure {
            hold_until: Some(Instant::now() + TAKEOVER_WAIT),
            // The dispatcher stops at the lease's end by itself, also when this
            // agent is held up elsewhere and steps down late.
            lease: Some(lease),
        };
        let handle = match self
            .shared
            .registry
            .handle(&self.group, create, tenure)
            .await
        {
            Ok((handle, created)) => {
                self.created = created;
                handle
            }
            Err(e) => {
                let _ = self
                    .shared
                    .leases
                    .delete_expect_revision(&self.group, Some(revision))
                    .await;
                return Err(e);
            }
        };
        tracing::info!(group = %self.group, waiting = ?waiting, "this node owns the group");
        self.role = Role::Owner(Owner {
            revision,
            valid_until,
            renew_at: sent + RENEW_EVERY,
            handle,
            remote: HashMap::new(),
            held_back: true,
            waiting,
            checked: Instant::now(),
        });
        Ok(())
    }

    /// Lets the dispatcher go once every node that may hold deliveries from the
    /// last owner has joined (or stopped announcing members), and every member
    /// here too; reads the announcements again while it waits.
    async fn maybe_release(&mut self) {
        let all_linked = self.members.values().all(|l| !matches!(l.link, Link::None));
        let Role::Owner(owner) = &mut self.role else {
            return;
        };
        if !owner.held_back {
            return;
        }
        if !owner.waiting.is_empty() && owner.checked.elapsed() >= TAKEOVER_RECHECK {
            owner.checked = Instant::now();
            let fresh = self.shared.member_nodes(&self.group).await;
            let Role::Owner(owner) = &mut self.role else {
                return;
            };
            owner.waiting = if owner.waiting.contains(UNKNOWN) {
                fresh
            } else {
                owner.waiting.intersection(&fresh).cloned().collect()
            };
        }
        let Role::Owner(owner) = &mut self.role else {
            return;
        };
        if owner.waiting.is_empty() && all_linked {
            owner.held_back = false;
            owner.handle.dispatch().await;
            tracing::debug!(group = %self.group, "dispatching");
        }
    }

    /// Joins a member here to the group's owner, finding the owner first when
    /// none is known: the first sequence the group had not settled, and whether
    /// this created the group.
    async fn link(
        &mut self,
        id: u64,
        create: Option<&SubscriptionSpec>,
    ) -> std::result::Result<(u64, bool), LinkError> {
        self.resolve(create).await.map_err(LinkError::Retry)?;
        let Some(local) = self.members.get_mut(&id) else {
            return Err(LinkError::Refused(StoreError::ShuttingDown));
        };
        let held: Vec<(u64, u32)> = local.held.iter().map(|(&s, &a)| (s, a)).collect();
        match &mut self.role {
            Role::Idle => Err(LinkError::Retry(StoreError::Unavailable("no owner".into()))),
            Role::Owner(owner) => {
                let handle = owner.handle.clone();
                // The subscribe whose take made the group created it.
                let created = create.is_some() && std::mem::take(&mut self.created);
                let joined = handle
                    .join_with(
                        local.patterns.clone(),
                        local.max_in_flight,
                        local.tx.clone(),
                        local.failure.clone(),
                        held,
                    )
                    .await;
                match joined {
                    Ok(joined) => {
                        local.held.clear();
                        for feedback in local.unsent.drain(..) {
                            let _ = joined.control.send(feedback).await;
                        }
                        local.link = Link::Local(joined.control);
                        Ok((joined.start_sequence, created))
                    }
                    Err(StoreError::ShuttingDown) if !*self.shared.shutdown.borrow() => {
                        // The dispatcher retired as it was asked.
                        self.role_lost().await;
                        Err(LinkError::Retry(StoreError::Unavailable(
                            "the group's dispatcher stopped".into(),
                        )))
                    }
                    Err(e) => Err(LinkError::Refused(e)),
                }
            }
            Role::Follower(holder) => {
                let holder = holder.clone();
                let request = JoinRequest {
                    from: self.shared.instance.clone(),
                    member: id,
                    patterns: local
                        .patterns
                        .iter()
                        .map(|p| p.as_str().to_owned())
                        .collect(),
                    max_in_flight: local.max_in_flight,
                    held,
                };
                let answer: std::result::Result<Joined, RelayError> = self
                    .shared
                    .request(
                        relay(&holder, "join"),
                        &self.group,
                        encode(&request),
                        "join",
                    )
                    .await;
                match answer {
                    Ok(joined) => {
                        let Some(local) = self.members.get_mut(&id) else {
                            return Err(LinkError::Refused(StoreError::ShuttingDown));
                        };
                        local.link = Link::Remote(joined.member);
                        let unsent = std::mem::take(&mut local.unsent);
                        for feedback in unsent {
                            self.send_remote(&holder, joined.member, id, feedback).await;
                        }
                        Ok((joined.start_sequence, joined.created))
                    }
                    Err(RelayError::Refused(e)) => Err(LinkError::Refused(e)),
                    Err(RelayError::NotOwner) | Err(RelayError::Lost(_)) => {
                        self.role = Role::Idle;
                        Err(LinkError::Retry(StoreError::Unavailable(format!(
                            "the owner of group {:?} did not answer",
                            self.group
                        ))))
                    }
                }
            }
        }
    }

    /// The dispatcher this node ran for the group is gone: the lease goes too,
    /// and its members here join whoever owns the group next.
    async fn role_lost(&mut self) {
        if let Role::Owner(owner) = &mut self.role {
            owner.remote.clear();
        }
        self.release().await;
        for local in self.members.values_mut() {
            if matches!(local.link, Link::Local(_)) {
                local.link = Link::None;
            }
        }
    }

    /// The node no longer owns the group (its lease could not be renewed): the
    /// dispatcher stops at once, and what members here hold stays theirs, to
    /// report to the next owner.
    async fn step_down(&mut self) {
        let Role::Owner(owner) = std::mem::replace(&mut self.role, Role::Idle) else {
            return;
        };
        tracing::warn!(group = %self.group, "this node lost the group's lease; handing it over");
        let held = owner.handle.abdicate().await;
        for local in self.members.values_mut() {
            if let Link::Local(control) = std::mem::replace(&mut local.link, Link::None) {
                for &(seq, attempt) in held.get(&control.member).into_iter().flatten() {
                    local.held.insert(seq, attempt);
                }
            }
        }
        let _ = self
            .shared
            .leases
            .delete_expect_revision(&self.group, Some(owner.revision))
            .await;
    }

    async fn admin(&mut self, op: AdminOp) -> Result<AdminAnswer> {
        let until = Instant::now() + ADMIN_PATIENCE;
        loop {
            let outcome = self.admin_once(op.clone()).await;
            match outcome {
                Err(AdminError::Retry(e)) if Instant::now() < until => {
                    tracing::debug!(group = %self.group, error = %e, "looking for the group's owner again");
                    tokio::time::sleep(TICK).await;
                }
                Err(AdminError::Retry(e) | AdminError::Refused(e)) => return Err(e),
                Ok(answer) => return Ok(answer),
            }
        }
    }

    async fn admin_once(&mut self, op: AdminOp) -> std::result::Result<AdminAnswer, AdminError> {
        if let Err(e) = self.resolve(None).await {
            return Err(match e {
                StoreError::NotFound(_) => AdminError::Refused(e),
                e => AdminError::Retry(e),
            });
        }
        match &self.role {
            Role::Idle => Err(AdminError::Retry(StoreError::Unavailable(
                "no owner".into(),
            ))),
            Role::Owner(_) => match self.run_admin(op).await {
                Err(StoreError::FailedPrecondition(m)) if m.contains("keeps stopping") => {
                    Err(AdminError::Retry(StoreError::FailedPrecondition(m)))
                }
                other => other.map_err(AdminError::Refused),
            },
            Role::Follower(holder) => {
                let answer = self
                    .shared
                    .request(relay(holder, "admin"), &self.group, encode(&op), "admin")
                    .await;
                match answer {
                    Ok(answer) => Ok(answer),
                    Err(RelayError::Refused(e)) => Err(AdminError::Refused(e)),
                    Err(RelayError::NotOwner | RelayError::Lost(_)) => {
                        self.role = Role::Idle;
                        Err(AdminError::Retry(StoreError::Unavailable(format!(
                            "the owner of group {:?} did not answer",
                            self.group
                        ))))
                    }
                }
            }
        }
    }

    /// Runs an admin call on this node's dispatcher (the node owns the group).
    async fn run_admin(&mut self, op: AdminOp) -> Result<AdminAnswer> {
        let registry = &self.shared.registry;
        let group = self.group.as_str();
        let answer = match op {
            AdminOp::Info => AdminAnswer::Info(registry.ask(group, Command::Info).await?),
            AdminOp::Seek(floor) => AdminAnswer::Info(registry.seek(group, floor).await?),
            AdminOp::Flush => {
                registry.ask(group, Command::Flush).await?;
                AdminAnswer::Done
            }
            AdminOp::Redrive(sequences) => {
                AdminAnswer::Count(registry.redrive(group, &sequences).await?)
            }
            AdminOp::Purge(sequences) => {
                AdminAnswer::Count(registry.purge(group, &sequences).await?)
            }
            AdminOp::Delete => AdminAnswer::Count(registry.ask(group, Command::Delete).await?),
        };
        Ok(answer)
    }

    async fn on_feedback(&mut self, id: u64, feedback: Feedback) {
        let holder = match &self.role {
            Role::Follower(holder) => Some(holder.clone()),
            _ => None,
        };
        let Some(local) = self.members.get_mut(&id) else {
            return;
        };
        match &local.link {
            Link::Local(control) => {
                if let Err(feedback) = control.feedback.send((control.member, feedback)).await {
                    local.unsent.push(feedback.0.1);
                }
            }
            Link::Remote(at_owner) => {
                let at_owner = *at_owner;
                match holder {
                    Some(holder) => self.send_remote(&holder, at_owner, id, feedback).await,
                    None => local.unsent.push(feedback),
                }
            }
            Link::None => local.unsent.push(feedback),
        }
    }

    /// Sends a member's feedback to the owner on another node.
    async fn send_remote(&mut self, holder: &str, at_owner: u64, id: u64, feedback: Feedback) {
        if let Some(local) = self.members.get_mut(&id) {
            let sequences = match &feedback {
                Feedback::Ack(s) => s,
                Feedback::Nack { sequences, .. } => sequences,
            };
            for seq in sequences {
                local.held.remove(seq);
            }
        }
        let message = match feedback {
            Feedback::Ack(acks) => FeedbackMessage {
                member: at_owner,
                acks,
                nacks: Vec::new(),
                delay_ms: 0,
                reason: String::new(),
            },
            Feedback::Nack {
                sequences,
                delay,
                reason,
            } => FeedbackMessage {
                member: at_owner,
                acks: Vec::new(),
                nacks: sequences,
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                reason,
            },
        };
        let mut headers = HeaderMap::new();
        headers.insert(GROUP_HEADER, self.group.as_str());
        self.shared
            .publish(relay(holder, "feedback"), headers, encode(&message))
            .await;
    }

    async fn on_leave(&mut self, id: u64) {
        let Some(local) = self.members.remove(&id) else {
            return;
        };
        if let (Link::Remote(at_owner), Role::Follower(holder)) = (&local.link, &self.role) {
            let mut headers = HeaderMap::new();
            headers.insert(GROUP_HEADER, self.group.as_str());
            self.shared
                .publish(relay(holder, "leave"), headers, encode(at_owner))
                .await;
        }
        // A local link leaves the dispatcher as its control drops here.
    }

    /// Keeps the lease, the links and the heartbeats.
    async fn look_after(&mut self) {
        let now = Instant::now();
        // Members the store ended (a damaged log) leave.
        let failed: Vec<u64> = self
            .members
            .iter()
            .filter(|(_, l)| l.failure.get().is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in failed {
            self.members.remove(&id);
        }
        match &mut self.role {
            Role::Owner(owner) => {
                let closed = owner.handle.is_closed();
                let renew = now >= owner.renew_at;
                if closed {
                    // Retired (no member anywhere), deleted, or stopped.
                    self.role_lost().await;
                } else {
                    if renew {
                        self.renew().await;
                    }
                    let lapsed = match &mut self.role {
                        Role::Owner(owner) => {
                            owner
                                .remote
                                .retain(|_, r| now.duration_since(r.heard) < REMOTE_SILENCE);
                            Instant::now() >= *owner.valid_until.borrow()
                        }
                        _ => false,
                    };
                    if lapsed {
                        self.step_down().await;
                    }
                }
            }
            Role::Follower(holder) => {
                let holder = holder.clone();
                match self.shared.leases.entry(&self.group).await {
                    Ok(Some(entry))
                        if entry.operation == kv::Operation::Put
                            && entry.value.as_ref() == holder.as_bytes() => {}
                    Ok(_) => {
                        tracing::info!(group = %self.group, "the group's owner changed");
                        self.role = Role::Idle;
                        for local in self.members.values_mut() {
                            local.link = Link::None;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(group = %self.group, error = %e, "reading the group's lease")
                    }
                }
                if matches!(self.role, Role::Follower(_)) && now >= self.heartbeat_at {
                    self.heartbeat_at = now + HEARTBEAT_EVERY;
                    self.heartbeat(&holder).await;
                }
            }
            Role::Idle => {}
        }
        // Members not joined to the present owner join it.
        let unlinked: Vec<u64> = self
            .members
            .iter()
            .filter(|(_, l)| matches!(l.link, Link::None))
            .map(|(&id, _)| id)
            .collect();
        for id in unlinked {
            if let Err(LinkError::Refused(e) | LinkError::Retry(e)) = self.link(id, None).await {
                tracing::debug!(group = %self.group, member = id, error = %e, "joining the group's owner");
                break;
            }
        }
        self.maybe_release().await;
    }

    async fn renew(&mut self) {
        let Role::Owner(owner) = &mut self.role else {
            return;
        };
        let sent = Instant::now();
        owner.renew_at = sent + RENEW_EVERY;
        // A renewal waits no later than the lease it renews stands: an owner cut
        // off from NATS (its request held until the client reconnects) must step
        // down on time, not when the request's own timeout ends, which could be
        // after another node took the lapsed lease.
        let until = *owner.valid_until.borrow();
        let renewed = tokio::time::timeout_at(
            until,
            self.shared.leases.update(
                &self.group,
                Bytes::from(self.shared.instance.clone()),
                owner.revision,
            ),
        )
        .await;
        match renewed {
            Ok(Ok(revision)) => {
                owner.revision = revision;
                owner
                    .valid_until
                    .send_replace(sent + LEASE_TTL - LEASE_MARGIN);
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                tracing::warn!(group = %self.group, "the group's lease lapsed");
                owner.valid_until.send_replace(sent);
            }
            Ok(Err(e)) => {
                tracing::warn!(group = %self.group, error = %e, "renewing the group's lease")
            }
            Err(_) => tracing::warn!(group = %self.group, "renewing the group's lease timed out"),
        }
    }

    async fn heartbeat(&mut self, holder: &str) {
        let members: Vec<u64> = self
            .members
            .values()
            .filter_map(|l| match l.link {
                Link::Remote(at_owner) => Some(at_owner),
                _ => None,
            })
            .collect();
        if members.is_empty() {
            return;
        }
        let beat = Heartbeat {
            from: self.shared.instance.clone(),
            members,
        };
        let answer: std::result::Result<Vec<u64>, RelayError> = self
            .shared
            .request(
                relay(holder, "heartbeat"),
                &self.group,
                encode(&beat),
                "heartbeat",
            )
            .await;
        match answer {
            Ok(unknown) => {
                for local in self.members.values_mut() {
                    if matches!(local.link, Link::Remote(m) if unknown.contains(&m)) {
                        local.link = Link::None;
                    }
                }
            }
            Err(RelayError::NotOwner) => {
                self.role = Role::Idle;
                for local in self.members.values_mut() {
                    local.link = Link::None;
                }
            }
            // The lease says when the owner is gone.
            Err(RelayError::Lost(e)) => {
                tracing::debug!(group = %self.group, error = %e, "no answer to a heartbeat");
            }
            Err(RelayError::Refused(e)) => {
                tracing::debug!(group = %self.group, error = %e, "a heartbeat refused");
            }
        }
    }

    async fn on_relay(&mut self, kind: &str, message: async_nats::Message) {
        match kind {
            "delivery" => self.on_delivery(&message),
            "end" => {
                if let Some(id) = header_u64(&message, MEMBER_HEADER)
                    && let Some(local) = self.members.remove(&id)
                {
                    let _ = local
                        .failure
                        .set(String::from_utf8_lossy(&message.payload).into_owned());
                }
            }
            "join" => {
                let answer = self.on_join(&message).await;
                self.shared.answer(&message, &answer).await;
                self.maybe_release().await;
            }
            "feedback" => self.on_remote_feedback(&message).await,
            "leave" => {
                if let (Role::Owner(owner), Ok(member)) =
                    (&mut self.role, decode::<u64>(&message.payload, "leave"))
                {
                    owner.remote.remove(&member);
                }
            }
            "heartbeat" => {
                let answer = self.on_heartbeat(&message);
                self.shared.answer(&message, &answer).await;
            }
            "admin" => {
                let answer = match (
                    &self.role,
                    decode::<AdminOp>(&message.payload, "admin call"),
                ) {
                    (Role::Owner(_), Ok(op)) => {
                        self.run_admin(op).await.map_err(|e| Failure::of(&e))
                    }
                    (Role::Owner(_), Err(e)) => Err(Failure::of(&e)),
                    _ => Err(Failure::not_owner()),
                };
                self.shared.answer(&message, &answer).await;
            }
            other => tracing::debug!(kind = other, "an unknown relay message"),
        }
    }

    /// A delivery from the owner to a member here.
    fn on_delivery(&mut self, message: &async_nats::Message) {
        let Role::Follower(holder) = &self.role else {
            return;
        };
        if header(message, OWNER_HEADER) != Some(holder.as_str()) {
            return;
        }
        let (Some(id), Some(sequence), Some(attempt)) = (
            header_u64(message, MEMBER_HEADER),
            header_u64(message, SEQUENCE_HEADER),
            header_u64(message, ATTEMPT_HEADER),
        ) else {
            return;
        };
        let Some(local) = self.members.get_mut(&id) else {
            return;
        };
        if !matches!(local.link, Link::Remote(_)) {
            return;
        }
        let Ok(event) = Event::decode(message.payload.as_ref()) else {
            tracing::warn!(group = %self.group, sequence, "a relayed delivery does not decode");
            return;
        };
        let attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
        let delivery = Delivery {
            event: Arc::new(StoredEvent { sequence, event }),
            attempt,
        };
        // Full only when the owner's count and the member's differ: the owner's ack
        // timeout delivers it again.
        if local.tx.try_send(delivery).is_ok() {
            local.held.insert(sequence, attempt);
        }
    }

    /// A member of another node joins this node's dispatcher.
    async fn on_join(&mut self, message: &async_nats::Message) -> Answer<Joined> {
        let Role::Owner(owner) = &mut self.role else {
            return Err(Failure::not_owner());
        };
        let request: JoinRequest = decode(&message.payload, "join").map_err(|e| Failure::of(&e))?;
        let patterns = request
            .patterns
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Failure::of(&StoreError::InvalidArgument(e.to_string())))?;
        owner.waiting.remove(&request.from);
        // A join asked again (its answer was lost) replaces the first.
        owner
            .remote
            .retain(|_, r| !(r.from == request.from && r.member == request.member));
        let max_in_flight = request
            .max_in_flight
            .clamp(1, SubscriptionSpec::MAX_MAX_IN_FLIGHT);
        let (tx, deliveries) = mpsc::channel(max_in_flight as usize);
        let failure = Arc::new(OnceLock::new());
        let joined = owner
            .handle
            .join_with(patterns, max_in_flight, tx, failure.clone(), request.held)
            .await
            .map_err(|e| Failure::of(&e))?;
        let forward = tokio::spawn(forward(
            self.shared.clone(),
            self.group.clone(),
            request.from.clone(),
            request.member,
            deliveries,
            failure,
        ));
        let member = joined.member;
        owner.remote.insert(
            member,
            Remote {
                from: request.from,
                member: request.member,
                control: joined.control,
                heard: Instant::now(),
                _forward: super::AbortOnDrop(forward),
            },
        );
        Ok(Joined {
            member,
            start_sequence: joined.start_sequence,
            created: false,
        })
    }

    async fn on_remote_feedback(&mut self, message: &async_nats::Message) {
        let Role::Owner(owner) = &mut self.role else {
            return;
        };
        let Ok(feedback) = decode::<FeedbackMessage>(&message.payload, "feedback") else {
            return;
        };
        let Some(remote) = owner.remote.get_mut(&feedback.member) else {
            return;
        };
        remote.heard = Instant::now();
        if !feedback.acks.is_empty() {
            let _ = remote.control.send(Feedback::Ack(feedback.acks)).await;
        }
        if !feedback.nacks.is_empty() {
            let _ = remote
                .control
                .send(Feedback::Nack {
                    sequences: feedback.nacks,
                    delay: Duration::from_millis(feedback.delay_ms),
                    reason: feedback.reason,
                })
                .await;
        }
    }

    fn on_heartbeat(&mut self, message: &async_nats::Message) -> Answer<Vec<u64>> {
        let Role::Owner(owner) = &mut self.role else {
            return Err(Failure::not_owner());
        };
        let beat: Heartbeat = decode(&message.payload, "heartbeat").map_err(|e| Failure::of(&e))?;
        let now = Instant::now();
        let mut unknown = Vec::new();
        for member in beat.members {
            match owner.remote.get_mut(&member) {
                Some(remote) if remote.from == beat.from => remote.heard = now,
                _ => unknown.push(member),
            }
        }
        Ok(unknown)
    }
}

enum LinkError {
    /// Worth another try: the owner moved, or did not answer.
    Retry(StoreError),
    /// The owner refused the member.
    Refused(StoreError),
}

enum AdminError {
    Retry(StoreError),
    Refused(StoreError),
}

/// Sends a remote member's deliveries to its node, and says why it ended when the
/// store ended it.
async fn forward(
    shared: Arc<Shared>,
    group: String,
    to: String,
    member: u64,
    mut deliveries: mpsc::Receiver<Delivery>,
    failure: Arc<OnceLock<String>>,
) {
    let subject = relay(&to, "delivery");
    let member = member.to_string();
    while let Some(delivery) = deliveries.recv().await {
        let mut headers = HeaderMap::new();
        headers.insert(GROUP_HEADER, group.as_str());
        headers.insert(MEMBER_HEADER, member.as_str());
        headers.insert(OWNER_HEADER, shared.instance.as_str());
        headers.insert(
            SEQUENCE_HEADER,
            delivery.event.sequence.to_string().as_str(),
        );
        headers.insert(ATTEMPT_HEADER, delivery.attempt.to_string().as_str());
        let payload = Bytes::from(delivery.event.event.encode_to_vec());
        shared.publish(subject.clone(), headers, payload).await;
    }
    if let Some(reason) = failure.get() {
        let mut headers = HeaderMap::new();
        headers.insert(GROUP_HEADER, group.as_str());
        headers.insert(MEMBER_HEADER, member.as_str());
        shared
            .publish(relay(&to, "end"), headers, Bytes::from(reason.clone()))
            .await;
    }
}
