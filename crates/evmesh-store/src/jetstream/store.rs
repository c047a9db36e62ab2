//! The JetStream [`Store`]: the log, the groups and the schema records of one
//! cluster, behind the same trait as the embedded log.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use evmesh_proto::v1::Event;
use tokio::sync::{mpsc, oneshot};

use super::mesh::{AdminOp, Mesh};
use super::{JetStreamConfig, JetStreamGroups, JetStreamLog, Outcome, Pending};
use crate::dispatch::{GroupCatalog, GroupLog as _, GroupRegistry};
use crate::{
    AppendTicket, Appended, DeadLetter, GroupInfo, Result, SchemaRecord, StartPosition, Store,
    StoreError, StoredEvent, Subscription, SubscriptionSpec,
};

/// Batches waiting for the publisher, in the order they were queued.
const QUEUED_BATCHES: usize = 1024;

type Queued = (Vec<Event>, oneshot::Sender<Result<Vec<Appended>>>);

/// A node's store over a JetStream cluster. Cloning shares it.
#[derive(Clone)]
pub struct JetStreamStore {
    log: JetStreamLog,
    groups: Arc<JetStreamGroups>,
    registry: GroupRegistry<JetStreamGroups>,
    /// Durable groups across the nodes: every call on one goes through here.
    mesh: Mesh,
    publisher: mpsc::Sender<Queued>,
}

impl JetStreamStore {
    /// Connects to the cluster, creating or checking what evmesh keeps there.
    pub async fn open(config: &JetStreamConfig) -> Result<Self> {
        let log = JetStreamLog::connect(config).await?;
        let groups = JetStreamGroups::open(log.clone(), config.replicas).await?;
        let (publisher, queue) = mpsc::channel(QUEUED_BATCHES);
        tokio::spawn(publish(log.clone(), queue, config.publish_window));
        let registry = GroupRegistry::new(groups.clone());
        let mesh = Mesh::open(
            log.clone(),
            registry.clone(),
            groups.watch_shutdown(),
            config.replicas,
        )
        .await?;
        Ok(Self {
            registry,
            mesh,
            log,
            groups,
            publisher,
        })
    }

    /// The last sequence in the events stream, as this node last heard of it.
    pub fn head(&self) -> u64 {
        self.log.head()
    }
}

/// Publishes queued batches, keeping up to `window` publishes in flight (JetStream
/// stores the publishes of one connection in the order they were sent), and
/// answers each batch once all of its events are answered, in queue order.
///
/// While every publish is answered, events get increasing sequences in the order
/// they were queued. At the first unknown outcome the pipeline stops: the rest of
/// the window is awaited, then every event whose outcome is unknown is sent again
/// in order, one at a time, until answered, before pipelining resumes. An event
/// that was lost while a later one in the window was stored then lands after it:
/// the one exception to order, stated in the README's guarantee table.
async fn publish(log: JetStreamLog, mut queue: mpsc::Receiver<Queued>, window: usize) {
    let mut open: VecDeque<Open> = VecDeque::new();
    let mut unsent: VecDeque<Event> = VecDeque::new();
    let mut in_flight: VecDeque<(Event, Pending)> = VecDeque::new();
    let mut closed = false;
    loop {
        while in_flight.len() < window {
            let Some(event) = unsent.pop_front() else {
                break;
            };
            let pending = log.send(&event).await;
            in_flight.push_back((event, pending));
        }
        let room = !closed && unsent.is_empty() && in_flight.len() < window;
        let Some((_, front)) = in_flight.front_mut() else {
            if closed {
                return;
            }
            match queue.recv().await {
                Some(batch) => accept(&log, batch, &mut open, &mut unsent),
                None => closed = true,
            }
            continue;
        };
        tokio::select! {
            biased;
            outcome = front => {
                let Some((event, _)) = in_flight.pop_front() else {
                    continue;
                };
                match outcome {
                    Outcome::Stored(appended) => {
                        log.stored(&appended, event);
                        settle(&mut open, Ok(appended));
                    }
                    Outcome::Unknown(why) => {
                        tracing::debug!(event_id = %event.id, error = %why, "publish outcome unknown; resending in order");
                        // One deadline for the whole window: when the cluster is
                        // gone, the window fails in one retry period, not one each.
                        let deadline = Instant::now() + log.publish_retry_for();
                        let mut window = vec![(event, None)];
                        for (event, pending) in in_flight.drain(..) {
                            let known = match pending.await {
                                Outcome::Stored(appended) => Some(appended),
                                Outcome::Unknown(_) => None,
                            };
                            window.push((event, known));
                        }
                        for (event, known) in window {
                            let answer = match known {
                                Some(appended) => Ok(appended),
                                None => log.publish_until_answered(&event, deadline).await,
                            };
                            if let Ok(appended) = &answer {
                                log.stored(appended, event);
                            }
                            settle(&mut open, answer);
                        }
                    }
                }
            }
            batch = queue.recv(), if room => {
                match batch {
                    Some(batch) => accept(&log, batch, &mut open, &mut unsent),
                    None => closed = true,
                }
            }
        }
    }
}

/// A batch whose events are being published.
struct Open {
    remaining: usize,
    answers: Result<Vec<Appended>>,
    reply: oneshot::Sender<Result<Vec<Appended>>>,
}

/// Takes a queued batch in: refused whole when the server cannot take one of its
/// events, else queued to send.
fn accept(
    log: &JetStreamLog,
    (events, reply): Queued,
    open: &mut VecDeque<Open>,
    unsent: &mut VecDeque<Event>,
) {
    if let Err(e) = log.check_sizes(&events) {
        let _ = reply.send(Err(e));
        return;
    }
    // The client would hold them until it reconnects: say so now instead, and
    // store nothing the caller was told failed.
    if !log.is_connected() {
        let _ = reply.send(Err(StoreError::Unavailable(
            "the node has lost its connection to NATS; it reconnects by itself: publish again shortly".into(),
        )));
        return;
    }
    if events.is_empty() {
        let _ = reply.send(Ok(Vec::new()));
        return;
    }
    open.push_back(Open {
        remaining: events.len(),
        answers: Ok(Vec::with_capacity(events.len())),
        reply,
    });
    unsent.extend(events);
}

/// Records the answer of the oldest unanswered event, and answers its batch when
/// it was the batch's last. A batch with an event that could not be stored fails
/// whole (its other events may be stored: the error says to publish it again).
fn settle(open: &mut VecDeque<Open>, answer: Result<Appended>) {
    // Every event in flight belongs to an open batch.
    let Some(batch) = open.front_mut() else {
        return;
    };
    match (&mut batch.answers, answer) {
        (Ok(answers), Ok(appended)) => answers.push(appended),
        (Ok(_), Err(e)) => batch.answers = Err(e),
        (Err(_), _) => {}
    }
    batch.remaining -= 1;
    if batch.remaining == 0
        && let Some(batch) = open.pop_front()
    {
        let _ = batch.reply.send(batch.answers);
    }
}

impl Store for JetStreamStore {
    async fn enqueue(&self, events: Vec<Event>) -> Result<AppendTicket> {
        let (reply, ticket) = AppendTicket::new();
        self.publisher
            .send((events, reply))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        Ok(ticket)
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription> {
        if spec.patterns.is_empty() {
            return Err(StoreError::InvalidArgument(
                "at least one pattern is required".into(),
            ));
        }
        match spec.group {
            Some(_) => self.mesh.subscribe(spec).await,
            None => self.registry.subscribe(spec).await,
        }
    }

    async fn chain(
        &self,
        correlation_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.log.chain(correlation_id, after, limit).await
    }

    async fn log_stats(&self) -> Result<crate::LogStats> {
        let mut events = self
            .log
            .context()
            .get_stream(super::EVENTS_STREAM)
            .await
            .map_err(|e| super::unavailable("reading the events stream", e))?;
        let info = events
            .info()
            .await
            .map_err(|e| super::unavailable("reading the events stream", e))?;
        Ok(crate::LogStats {
            first_sequence: if info.state.messages == 0 {
                0
            } else {
                info.state.first_sequence
            },
            head_sequence: info.state.last_sequence,
            bytes: info.state.bytes,
            work: None,
        })
    }

    async fn set_retention(&self, retention: crate::Retention) -> Result<()> {
        self.log.set_retention(retention).await
    }

    async fn local_groups(&self) -> Vec<crate::NodeGroup> {
        self.mesh.local_groups()
    }

    async fn announce_node(&self, mut record: crate::NodeRecord) -> Result<()> {
        self.mesh.named(&record.name);
        record.instance = self.mesh.instance().to_owned();
        self.log.announce_node(&record).await
    }

    async fn nodes(&self) -> Result<Vec<crate::NodeRecord>> {
        let mut nodes = self.log.nodes().await?;
        // An announcement stands for 10 s, a node that died owning a group for as
        // long: the lease says who owns it now.
        let mut owners = std::collections::HashMap::new();
        for node in &mut nodes {
            for group in node.groups.iter_mut().filter(|g| g.owner) {
                if !owners.contains_key(&group.name) {
                    let owner = self.mesh.owner(&group.name).await?;
                    owners.insert(group.name.clone(), owner);
                }
                group.owner = owners[&group.name].as_deref() == Some(node.instance.as_str());
            }
        }
        Ok(nodes)
    }

    async fn groups(&self, after: &str, limit: usize) -> Result<Vec<GroupInfo>> {
        let mut infos = Vec::new();
        for name in self.groups.names().await? {
            if name.as_str() <= after {
                continue;
            }
            if infos.len() >= limit {
                break;
            }
            infos.push(self.mesh.info(&name).await?);
        }
        Ok(infos)
    }

    async fn delete_group(&self, group: &str) -> Result<u64> {
        self.mesh.count(group, AdminOp::Delete).await
    }

    async fn seek(&self, group: &str, position: StartPosition) -> Result<GroupInfo> {
        let floor = self.groups.floor_for(position).await?;
        match self.mesh.admin(group, AdminOp::Seek(floor)).await? {
            super::mesh::AdminAnswer::Info(info) => Ok(info),
            _ => Err(StoreError::Backend(
                "the owner answered a seek with something else".into(),
            )),
        }
    }

    async fn dead_letters(&self, group: &str, after: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        // The group's latest state first, so that what is listed is current.
        self.mesh.admin(group, AdminOp::Flush).await?;
        self.groups.dead_letters(group, after, limit).await
    }

    async fn redrive(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        self.mesh
            .count(group, AdminOp::Redrive(sequences.to_vec()))
            .await
    }

    async fn purge(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        self.mesh
            .count(group, AdminOp::Purge(sequences.to_vec()))
            .await
    }

    async fn put_schema(&self, record: SchemaRecord, known: &[semver::Version]) -> Result<()> {
        self.log.put_schema(record, known).await
    }

    async fn schemas(&self) -> Result<Vec<SchemaRecord>> {
        self.log.schemas().await
    }

    async fn schemas_of(&self, event_type: &str) -> Result<Vec<SchemaRecord>> {
        self.log.schemas_of(event_type).await
    }

    fn serving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.log.connected()
    }

    fn schema_changes(&self) -> Option<mpsc::Receiver<Option<String>>> {
        Some(self.log.schema_changes())
    }

    async fn shutdown(&self) -> Result<()> {
        self.groups.stop();
        self.registry.stop().await;
        self.mesh.stop().await;
        Ok(())
    }
}
