//! Durable groups' state in JetStream, as group tasks see it ([`GroupLog`]): one
//! record per group in the `EVMESH_GROUPS` bucket (configuration, ack floor, settled
//! sequences above it, redriven dead letters, parked events), written whole at each
//! checkpoint with compare-and-set on the revision this node last wrote, so that a
//! second writer of one group is refused rather than interleaved; dead letters as
//! create-only records in `EVMESH_DLQ` on `evmesh.dlq.<group>.<sequence>`, the event
//! itself staying in the events stream.
//!
//! Why a record and not the consumer's own ack state: the shared dispatch core
//! decides every delivery (per-aggregate order, credit, delays, attempts, dead
//! letters); its changes are what must be kept, exactly as the SQLite backend keeps
//! them, and one owner at a time writes them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::subject::token;
use super::{DLQ_STREAM, JetStreamLog, unavailable};
use crate::dispatch::{
    Checkpoint, GroupCatalog, GroupLog, GroupRow, ParkedChange, ParkedRow, Restored,
};
use crate::{Pattern, Result, StartPosition, StoreError, StoredEvent};

/// The bucket of group records.
pub const GROUPS_BUCKET: &str = "EVMESH_GROUPS";

/// A parked event in a group record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Parked {
    seq: u64,
    /// Unix milliseconds; `None` waits for its aggregate.
    due_ms: Option<u64>,
    attempts: u32,
    aggregate_id: String,
}

/// One durable group as kept in the bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct GroupRecord {
    patterns: Vec<String>,
    ack_timeout_ms: u64,
    max_deliveries: u32,
    floor: u64,
    settled: BTreeSet<u64>,
    redrive: BTreeSet<u64>,
    parked: Vec<Parked>,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl GroupRecord {
    fn new(row: &GroupRow) -> Self {
        Self {
            patterns: row.patterns.iter().map(|p| p.as_str().to_owned()).collect(),
            ack_timeout_ms: u64::try_from(row.ack_timeout.as_millis()).unwrap_or(u64::MAX),
            max_deliveries: row.max_deliveries,
            floor: row.ack_floor,
            settled: BTreeSet::new(),
            redrive: BTreeSet::new(),
            parked: Vec::new(),
        }
    }

    fn row(&self, name: &str) -> Result<GroupRow> {
        let patterns = self
            .patterns
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                StoreError::InvalidArgument(format!("stored pattern of group {name:?} {e}"))
            })?;
        Ok(GroupRow {
            name: name.to_owned(),
            patterns,
            ack_timeout: Duration::from_millis(self.ack_timeout_ms),
            max_deliveries: self.max_deliveries,
            ack_floor: self.floor,
        })
    }

    /// Applies a checkpoint's changes, as the SQLite writer applies them to its
    /// tables.
    fn apply(&mut self, checkpoint: &Checkpoint) {
        let changes = &checkpoint.changes;
        if changes.reset {
            self.settled.clear();
        }
        for (seq, change) in &changes.parked {
            self.parked.retain(|p| p.seq != *seq);
            if let ParkedChange::Set {
                due,
                attempts,
                aggregate_id,
            } = change
            {
                self.parked.push(Parked {
                    seq: *seq,
                    due_ms: due.map(ms),
                    attempts: *attempts,
                    aggregate_id: aggregate_id.clone(),
                });
            }
        }
        self.floor = checkpoint.floor;
        self.settled.extend(changes.settled.iter().copied());
        let floor = self.floor;
        self.settled.retain(|&s| s > floor);
        for seq in &changes.unredrive {
            self.redrive.remove(seq);
        }
    }
}

/// Group records and dead letters over one [`JetStreamLog`].
pub struct JetStreamGroups {
    log: JetStreamLog,
    records: kv::Store,
    dlq: jetstream::Context,
    /// The revision of each group's record as this node last read or wrote it.
    revisions: Mutex<HashMap<String, u64>>,
    shutdown: watch::Sender<bool>,
    idle_group_exit: Duration,
}

/// The subjects of one group's dead letters, or of one of them.
fn dlq_subject(group: &str, seq: Option<u64>) -> String {
    match seq {
        Some(seq) => format!("evmesh.dlq.{}.{seq}", token(group)),
        None => format!("evmesh.dlq.{}.>", token(group)),
    }
}

impl JetStreamGroups {
    /// Opens (creating when missing) the bucket of group records.
    pub async fn open(log: JetStreamLog, replicas: usize) -> Result<Arc<Self>> {
        let js = log.context();
        let records = super::bucket(&js, GROUPS_BUCKET, replicas).await?;
        Ok(Arc::new(Self {
            log,
            records,
            dlq: js,
            revisions: Mutex::default(),
            shutdown: watch::Sender::new(false),
            idle_group_exit: Duration::from_secs(5),
        }))
    }

    /// The group's record and its revision.
    async fn record(&self, group: &str) -> Result<Option<(GroupRecord, u64)>> {
        let Some(entry) = self
            .records
            .entry(group)
            .await
            .map_err(|e| unavailable("reading a group", e))?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record: GroupRecord = serde_json::from_slice(&entry.value).map_err(|e| {
            StoreError::Backend(
                format!("the record of group {group:?} does not decode: {e}").into(),
            )
        })?;
        Ok(Some((record, entry.revision)))
    }

    /// A durable group's configuration, when it exists.
    pub(crate) async fn group_row(&self, group: &str) -> Result<Option<GroupRow>> {
        match self.record(group).await? {
            Some((record, revision)) => {
                self.revisions_lock().insert(group.to_owned(), revision);
                record.row(group).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Creates a group; false when one of that name exists already (another node
    /// created it first, say), whose configuration is then the one to use.
    pub(crate) async fn create_group(&self, row: &GroupRow) -> Result<bool> {
        let value = serde_json::to_vec(&GroupRecord::new(row))
            .map_err(|e| StoreError::Backend(e.into()))?;
        match self.records.create(&row.name, Bytes::from(value)).await {
            Ok(revision) => {
                self.revisions_lock().insert(row.name.clone(), revision);
                Ok(true)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(unavailable("creating a group", e)),
        }
    }

    /// Every durable group's name, in name order.
    pub(crate) async fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for name in super::keys(&self.records, ">", "listing groups").await? {
            // A deleted group's marker holds its subject.
            let live = self
                .records
                .get(&name)
                .await
                .map_err(|e| unavailable("reading a group", e))?
                .is_some();
            if live {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Tells every group task to finish: the store is stopping.
    pub(crate) fn stop(&self) {
        self.shutdown.send_replace(true);
    }

    fn revisions_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.revisions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the record, changes it, and writes it back at the revision it was
    /// read at: a record another writer changed meanwhile is refused.
    async fn update(&self, group: &str, change: impl FnOnce(&mut GroupRecord)) -> Result<()> {
        let (mut record, revision) = self
            .record(group)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("group {group:?}")))?;
        let known = self.revisions_lock().get(group).copied();
        if known.is_some_and(|known| known != revision) {
            return Err(StoreError::FailedPrecondition(format!(
                "group {group:?} was changed by another node; this node no longer owns it"
            )));
        }
        change(&mut record);
        let value = serde_json::to_vec(&record).map_err(|e| StoreError::Backend(e.into()))?;
        let written = self
            .records
            .update(group, Bytes::from(value), revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StoreError::FailedPrecondition(format!(
                    "group {group:?} was changed by another node; this node no longer owns it"
                )),
                _ => unavailable("writing a group", e),
            })?;
        self.revisions_lock().insert(group.to_owned(), written);
        Ok(())
    }

    /// The event sequences of a group's dead letters, in order: one look at the
    /// dead-letter stream's subjects, no record read.
    async fn dead_sequences(&self, group: &str) -> Result<Vec<u64>> {
        use futures_util::TryStreamExt as _;
        let stream = self.dlq_stream().await?;
        let info = stream
            .info_with_subjects(dlq_subject(group, None))
            .await
            .map_err(|e| unavailable("reading dead letters", e))?;
        let mut sequences: Vec<u64> = info
            .try_collect::<HashMap<String, usize>>()
            .await
            .map_err(|e| unavailable("reading dead letters", e))?
            .keys()
            .filter_map(|subject| subject.rsplit('.').next()?.parse().ok())
            .collect();
        sequences.sort_unstable();
        Ok(sequences)
    }

    async fn dlq_stream(&self) -> Result<jetstream::stream::Stream> {
        self.dlq
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| unavailable("reading dead letters", e))
    }

    /// One dead-letter record: attempts, reason, time.
    async fn dead_record(
        &self,
        stream: &jetstream::stream::Stream,
        group: &str,
        seq: u64,
    ) -> Result<(u32, String, SystemTime)> {
        let message = stream
            .direct_get_last_for_subject(dlq_subject(group, Some(seq)))
            .await
            .map_err(|e| unavailable("reading a dead letter", e))?;
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let attempts = header("Evmesh-Attempts").parse().unwrap_or(0);
        let at = UNIX_EPOCH + Duration::from_millis(header("Evmesh-Dead-At").parse().unwrap_or(0));
        let reason = String::from_utf8_lossy(&message.payload).into_owned();
        Ok((attempts, reason, at))
    }

    /// Purges a group's dead-letter records (all when `sequences` is empty).
    async fn purge_dead(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        let stream = self
            .dlq
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| unavailable("purging dead letters", e))?;
        let filters: Vec<String> = if sequences.is_empty() {
            vec![dlq_subject(group, None)]
        } else {
            sequences
                .iter()
                .map(|&s| dlq_subject(group, Some(s)))
                .collect()
        };
        let mut purged = 0;
        for filter in filters {
            purged += stream
                .purge()
                .filter(filter)
                .await
                .map_err(|e| unavailable("purging dead letters", e))?
                .purged;
        }
        Ok(purged)
    }

    /// The events of a group's dead letters above `after`, oldest first, at most
    /// `limit`.
    pub(crate) async fn dead_letters(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<crate::DeadLetter>> {
        let stream = self.dlq_stream().await?;
        let mut letters = Vec::new();
        for seq in self.dead_sequences(group).await? {
            if seq <= after {
                continue;
            }
            if letters.len() >= limit {
                break;
            }
            let (attempts, reason, dead_at) = self.dead_record(&stream, group, seq).await?;
            let event = self.log.read_one(seq).await?;
            letters.push(crate::DeadLetter {
                sequence: seq,
                event: event.map(|e| Arc::unwrap_or_clone(e).event),
                attempts,
                reason,
                dead_at,
            });
        }
        Ok(letters)
    }
}

impl GroupLog for JetStreamGroups {
    fn head(&self) -> u64 {
        self.log.head()
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.log.watch_head()
    }

    fn watch_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn idle_group_exit(&self) -> Duration {
        self.idle_group_exit
    }

    async fn read_one(&self, seq: u64) -> Result<Option<Arc<StoredEvent>>> {
        self.log.read_one(seq).await
    }

    async fn read_from(&self, seq: u64, n: usize) -> Result<Vec<Arc<StoredEvent>>> {
        self.log.read_from(seq, n).await
    }

    async fn restore(&self, group: &str) -> Result<Restored> {
        let (record, revision) = self
            .record(group)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("group {group:?}")))?;
        self.revisions_lock().insert(group.to_owned(), revision);
        let dead_count = self.dead_sequences(group).await?.len() as u64;
        Ok(Restored {
            settled: record.settled.into_iter().collect(),
            redrive: record.redrive.into_iter().collect(),
            dead_count,
            parked: record
                .parked
                .into_iter()
                .map(|p| ParkedRow {
                    sequence: p.seq,
                    due: p.due_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                    attempts: p.attempts,
                    aggregate_id: p.aggregate_id,
                })
                .collect(),
        })
    }

    async fn checkpoint(&self, mut checkpoint: Checkpoint) -> Result<()> {
        let reply = checkpoint.reply.take();
        let result = async {
            // Dead letters first: a crash before the record is written delivers the
            // event again, and the repeat record is refused as a duplicate.
            for dead in &checkpoint.changes.dead {
                let subject = dlq_subject(&checkpoint.group, Some(dead.sequence));
                let publish = jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(dead.reason.clone()))
                    .expected_last_subject_sequence(0)
                    .header("Evmesh-Attempts", dead.attempts.to_string().as_str())
                    .header("Evmesh-Dead-At", ms(dead.dead_at).to_string().as_str());
                let ack = self
                    .dlq
                    .send_publish(subject, publish)
                    .await
                    .map_err(|e| unavailable("writing a dead letter", e))?;
                match ack.await {
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {}
                    Err(e) => return Err(unavailable("writing a dead letter", e)),
                }
            }
            self.update(&checkpoint.group, |record| record.apply(&checkpoint))
                .await
        }
        .await;
        // As the SQLite writer: a checkpoint with a reply answers there.
        match reply {
            Some(reply) => {
                let _ = reply.send(result);
                Ok(())
            }
            None => result,
        }
    }

    async fn update_patterns(&self, group: &str, patterns: &[Pattern]) -> Result<()> {
        let patterns: Vec<String> = patterns.iter().map(|p| p.as_str().to_owned()).collect();
        self.update(group, |record| record.patterns = patterns)
            .await
    }

    async fn redrive(&self, group: &str, sequences: Vec<u64>) -> Result<Vec<u64>> {
        let mut moved = self.dead_sequences(group).await?;
        if !sequences.is_empty() {
            moved.retain(|seq| sequences.contains(seq));
        }
        if moved.is_empty() {
            return Ok(moved);
        }
        // The record first: a crash before the purge leaves a dead letter that is
        // also redriven, delivered again (at least once), never lost.
        self.update(group, |record| record.redrive.extend(moved.iter().copied()))
            .await?;
        self.purge_dead(group, &moved).await?;
        Ok(moved)
    }

    async fn purge(&self, group: &str, sequences: Vec<u64>) -> Result<u64> {
        self.purge_dead(group, &sequences).await
    }

    async fn delete_group(&self, group: &str) -> Result<u64> {
        let dead = self.purge_dead(group, &[]).await?;
        self.records
            .purge(group)
            .await
            .map_err(|e| unavailable("deleting a group", e))?;
        self.revisions_lock().remove(group);
        Ok(dead)
    }
}

impl GroupCatalog for JetStreamGroups {
    async fn group_row(&self, name: &str) -> Result<Option<GroupRow>> {
        JetStreamGroups::group_row(self, name).await
    }

    async fn create_group(&self, row: GroupRow) -> Result<GroupRow> {
        if JetStreamGroups::create_group(self, &row).await? {
            return Ok(row);
        }
        // Another node made it first: its configuration holds.
        JetStreamGroups::group_row(self, &row.name)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("group {:?}", row.name)))
    }

    async fn floor_for(&self, position: StartPosition) -> Result<u64> {
        let head = self.log.head();
        Ok(match position {
            StartPosition::Earliest => 0,
            StartPosition::Latest => head,
            StartPosition::Sequence(seq) => seq.saturating_sub(1).min(head),
            StartPosition::Time(t) => match self.log.first_at_or_after(t).await? {
                Some(first) => first - 1,
                None => head,
            },
        })
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// The shared group task over JetStream group records, against a real nats-server.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use evmesh_proto::v1::Event;

    use super::*;
    use crate::dispatch::{Command, Groups, Tenure, spawn_durable};
    use crate::jetstream::JetStreamConfig;
    use crate::{Feedback, SubscriptionSpec};

    /// A nats-server on a free port, killed by its PID when dropped.
    struct Server {
        child: std::process::Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl Server {
        /// The server picks its port and writes it to a ports file (a port picked
        /// here could be taken by another test's server before this one binds it).
        async fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut child = std::process::Command::new("nats-server")
                .args(["--jetstream", "--addr", "127.0.0.1", "--port", "-1"])
                .arg("--store_dir")
                .arg(dir.path())
                .arg("--ports_file_dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("nats-server on PATH (the README's test command installs it)");
            let ports = dir.path().join(format!("nats-server_{}.ports", child.id()));
            for _ in 0..1000 {
                let url = std::fs::read(&ports)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["nats"][0].as_str().map(str::to_owned));
                if let Some(url) = url {
                    return Self {
                        child,
                        url,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server wrote no ports file within 10 s");
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn event(id: &str, aggregate: &str) -> Event {
        Event {
            id: id.into(),
            r#type: "t.x".into(),
            correlation_id: "c".into(),
            aggregate_id: aggregate.into(),
            ..Default::default()
        }
    }

    fn row() -> GroupRow {
        GroupRow {
            name: "billing.workers".into(),
            patterns: vec![Pattern::parse("t.>").unwrap()],
            ack_timeout: Duration::from_secs(30),
            max_deliveries: 2,
            ack_floor: 0,
        }
    }

    fn spec() -> SubscriptionSpec {
        SubscriptionSpec {
            group: Some("billing.workers".into()),
            ..SubscriptionSpec::new(vec![Pattern::parse("t.>").unwrap()])
        }
    }

    async fn open(server: &Server) -> Arc<JetStreamGroups> {
        let log = JetStreamLog::connect(&JetStreamConfig::new(vec![server.url.clone()]))
            .await
            .unwrap();
        JetStreamGroups::open(log, 1).await.unwrap()
    }

    async fn next(sub: &mut crate::Subscription) -> (u64, u32) {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a delivery in time")
            .expect("a delivery");
        (d.event.sequence, d.attempt)
    }

    /// A mesh owner's dispatcher stops at its lease's end by itself (its agent may
    /// be held up), and goes on once the lease is renewed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dispatcher_whose_lease_ended_dispatches_nothing_until_it_is_renewed() {
        let server = Server::start().await;
        let groups = open(&server).await;
        assert!(groups.create_group(&row()).await.unwrap());
        groups
            .log
            .append(vec![event("a1", "a"), event("b1", "b")])
            .await
            .unwrap();
        let stored = groups.group_row("billing.workers").await.unwrap().unwrap();
        let (lease, lease_rx) = tokio::sync::watch::channel(tokio::time::Instant::now());
        let tenure = Tenure {
            hold_until: None,
            lease: Some(lease_rx),
        };
        let (handle, task) = spawn_durable(
            groups.clone(),
            stored,
            Groups::default(),
            tenure,
            Arc::default(),
        )
        .await
        .unwrap();
        let spec = spec();
        let mut sub = handle.join(spec, false).await.unwrap();
        // Two round trips: the dispatcher has read the events and passed its gate.
        for _ in 0..2 {
            let (reply, flushed) = tokio::sync::oneshot::channel();
            handle.send(Command::Flush(reply)).await.unwrap();
            flushed.await.unwrap().unwrap();
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), sub.next())
                .await
                .is_err(),
            "delivered after the lease ended"
        );
        lease.send_replace(tokio::time::Instant::now() + Duration::from_secs(60));
        let mut delivered = vec![next(&mut sub).await, next(&mut sub).await];
        delivered.sort();
        assert_eq!(delivered, [(1, 1), (2, 1)]);
        drop(sub);
        drop(handle);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_runs_over_jetstream_and_keeps_its_state_there() {
        let server = Server::start().await;
        let groups = open(&server).await;
        assert!(groups.create_group(&row()).await.unwrap());
        assert!(!groups.create_group(&row()).await.unwrap());
        groups
            .log
            .append(vec![
                event("a1", "a"),
                event("a2", "a"),
                event("b1", "b"),
                event("c1", "c"),
            ])
            .await
            .unwrap();
        let stored = groups.group_row("billing.workers").await.unwrap().unwrap();
        let (handle, task) = spawn_durable(
            groups.clone(),
            stored,
            Groups::default(),
            Tenure::default(),
            Arc::default(),
        )
        .await
        .unwrap();
        let spec = spec();
        let mut sub = handle.join(spec.clone(), false).await.unwrap();
        let control = sub.control();
        let mut first = vec![
            next(&mut sub).await,
            next(&mut sub).await,
            next(&mut sub).await,
        ];
        first.sort();
        // One event per aggregate at a time: a2 waits for a1.
        assert_eq!(first, [(1, 1), (3, 1), (4, 1)]);
        control.send(Feedback::Ack(vec![1, 3])).await.unwrap();
        assert_eq!(next(&mut sub).await, (2, 1));
        control.send(Feedback::Ack(vec![2])).await.unwrap();
        // Nacked twice: a dead letter with its reason, in EVMESH_DLQ.
        control
            .send(Feedback::Nack {
                sequences: vec![4],
                delay: Duration::ZERO,
                reason: "first".into(),
            })
            .await
            .unwrap();
        assert_eq!(next(&mut sub).await, (4, 2));
        control
            .send(Feedback::Nack {
                sequences: vec![4],
                delay: Duration::ZERO,
                reason: "card declined".into(),
            })
            .await
            .unwrap();
        let (reply, flushed) = tokio::sync::oneshot::channel();
        handle.send(Command::Flush(reply)).await.unwrap();
        flushed.await.unwrap().unwrap();
        let (record, _) = groups.record("billing.workers").await.unwrap().unwrap();
        assert_eq!(record.floor, 4);
        let dead = groups.dead_letters("billing.workers", 0, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].sequence, dead[0].attempts, dead[0].reason.as_str()),
            (4, 2, "card declined")
        );
        drop(sub);
        drop(control);
        drop(handle);
        task.abort();
        let _ = task.await;

        // Another node (a fresh view of the same records) redrives it: delivered
        // again at attempt 1, and the dead letter is gone.
        let other = open(&server).await;
        let stored = other.group_row("billing.workers").await.unwrap().unwrap();
        assert_eq!(stored.ack_floor, 4);
        let (handle, task) = spawn_durable(
            other.clone(),
            stored,
            Groups::default(),
            Tenure::default(),
            Arc::default(),
        )
        .await
        .unwrap();
        let mut sub = handle.join(spec, false).await.unwrap();
        let (reply, moved) = tokio::sync::oneshot::channel();
        handle
            .send(Command::Redrive {
                sequences: Vec::new(),
                reply,
            })
            .await
            .unwrap();
        assert_eq!(moved.await.unwrap().unwrap(), 1);
        assert_eq!(next(&mut sub).await, (4, 1));
        assert!(
            other
                .dead_letters("billing.workers", 0, 10)
                .await
                .unwrap()
                .is_empty()
        );
        // The first node's view is stale now: its write is refused, not merged.
        let refused = groups
            .update("billing.workers", |record| record.floor = 0)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::FailedPrecondition(_)),
            "{refused}"
        );
        drop(sub);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_start_where_asked_through_the_registry() {
        use crate::StartPosition;
        use crate::dispatch::GroupRegistry;

        let server = Server::start().await;
        let groups = open(&server).await;
        groups
            .log
            .append(vec![event("old-1", ""), event("old-2", "")])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let cut = SystemTime::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        groups
            .log
            .append(vec![event("new-1", ""), event("new-2", "")])
            .await
            .unwrap();
        let registry = GroupRegistry::new(groups.clone());
        let subscribe = |name: Option<&str>, start| {
            let mut spec = SubscriptionSpec::new(vec![Pattern::parse("t.>").unwrap()]);
            spec.group = name.map(Into::into);
            spec.start = start;
            registry.subscribe(spec)
        };
        for (name, start, first) in [
            (Some("from.time"), StartPosition::Time(cut), 3),
            (Some("from.sequence"), StartPosition::Sequence(2), 2),
            (Some("from.earliest"), StartPosition::Earliest, 1),
            (None, StartPosition::Time(cut), 3),
        ] {
            let mut sub = subscribe(name, start).await.unwrap();
            assert_eq!(sub.start_sequence, first, "{name:?}");
            assert_eq!(next(&mut sub).await, (first, 1), "{name:?}");
        }
        // A group made by one subscribe is found by the next, with its start.
        let again = subscribe(Some("from.time"), StartPosition::Earliest)
            .await
            .unwrap();
        assert!(!again.created);
        let latest = subscribe(Some("from.latest"), StartPosition::Latest)
            .await
            .unwrap();
        assert_eq!(latest.start_sequence, 5);
        // After the last event: nothing.
        let future = SystemTime::now() + Duration::from_secs(3600);
        let none = subscribe(Some("from.future"), StartPosition::Time(future))
            .await
            .unwrap();
        assert_eq!(none.start_sequence, 5);
        groups.shutdown.send_replace(true);
        registry.stop().await;
    }
}
