//! The JetStream [`Store`]: the log, the groups and the schema records of one
//! cluster, behind the same trait as the embedded log.

use std::sync::Arc;

use evmesh_proto::v1::Event;
use tokio::sync::{mpsc, oneshot};

use super::{JetStreamConfig, JetStreamGroups, JetStreamLog};
use crate::dispatch::{Command, GroupCatalog, GroupRegistry};
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
    publisher: mpsc::Sender<Queued>,
}

impl JetStreamStore {
    /// Connects to the cluster, creating or checking what evmesh keeps there.
    pub async fn open(config: &JetStreamConfig) -> Result<Self> {
        let log = JetStreamLog::connect(config).await?;
        let groups = JetStreamGroups::open(log.clone(), config.replicas).await?;
        let (publisher, queue) = mpsc::channel(QUEUED_BATCHES);
        tokio::spawn(publish(log.clone(), queue));
        Ok(Self {
            registry: GroupRegistry::new(groups.clone()),
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

/// Publishes queued batches one after another, each event in order, so that events
/// queued by one caller get increasing sequences in the order they were queued.
async fn publish(log: JetStreamLog, mut queue: mpsc::Receiver<Queued>) {
    while let Some((events, reply)) = queue.recv().await {
        let _ = reply.send(log.append(events).await);
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
        self.registry.subscribe(spec).await
    }

    async fn chain(
        &self,
        correlation_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.log.chain(correlation_id, after, limit).await
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
            infos.push(self.registry.ask(&name, Command::Info).await?);
        }
        Ok(infos)
    }

    async fn delete_group(&self, group: &str) -> Result<u64> {
        self.registry.ask(group, Command::Delete).await
    }

    async fn seek(&self, group: &str, position: StartPosition) -> Result<GroupInfo> {
        let floor = self.groups.floor_for(position).await?;
        self.registry.seek(group, floor).await
    }

    async fn dead_letters(&self, group: &str, after: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        // The group's latest state first, so that what is listed is current.
        self.registry.ask(group, Command::Flush).await?;
        self.groups.dead_letters(group, after, limit).await
    }

    async fn redrive(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        self.registry.redrive(group, sequences).await
    }

    async fn purge(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        self.registry.purge(group, sequences).await
    }

    async fn put_schema(&self, record: SchemaRecord) -> Result<()> {
        self.log.put_schema(record).await
    }

    async fn schemas(&self) -> Result<Vec<SchemaRecord>> {
        self.log.schemas().await
    }

    async fn shutdown(&self) -> Result<()> {
        self.groups.stop();
        self.registry.stop().await;
        Ok(())
    }
}
